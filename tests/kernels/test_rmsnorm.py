"""The fused Llama-style RMSNorm (forward and backward) against transformers' LlamaRMSNorm under autograd.

Both paths: the Triton kernels (interpreter on CPU, tests/conftest.py) and the chunked torch fallback.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from sft_plugins.kernels import _rmsnorm
from sft_plugins.kernels._backend import triton_runs_on
from sft_plugins.plugins.smart_checkpointing.lean_norm import is_llama_rmsnorm, lean_rmsnorm

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PATHS = ["triton", "torch"] if triton_runs_on(torch.device(DEV)) else ["torch"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5), (2, 37, 64), (9, 300)])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen_w", "trainable_w"])
def test_rmsnorm_matches_llama_rmsnorm(path, dtype, shape, weight_grad, monkeypatch):
    monkeypatch.setattr(_rmsnorm, "_use_triton", lambda t: path == "triton")
    gen = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=gen).mul(0.5).add(1))
    norm = norm.to(DEV, dtype).requires_grad_(weight_grad)
    x = torch.randn(shape, generator=gen).mul(2).to(DEV, dtype)
    dy = torch.randn(shape, generator=gen).to(DEV, dtype)
    assert is_llama_rmsnorm(norm)

    x_ref = x.clone().requires_grad_()
    y_ref = norm(x_ref)
    y_ref.backward(dy)
    w_grad_ref = norm.weight.grad
    norm.weight.grad = None
    x_ours = x.clone().requires_grad_()
    y = lean_rmsnorm(x_ours, norm.weight, norm.variance_epsilon)
    y.backward(dy)

    tol = TOL[dtype]
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(x_ours.grad.float(), x_ref.grad.float(), rtol=tol, atol=tol * 5)
    if weight_grad:
        torch.testing.assert_close(norm.weight.grad.float(), w_grad_ref.float(), rtol=tol, atol=tol * shape[-2])
    else:
        assert norm.weight.grad is None


@pytest.mark.parametrize("path", ["triton", "torch"] if DEV == "cuda" else ["torch"])  # the interpreter
def test_rmsnorm_forward_rounds_like_hf_in_bf16(path, monkeypatch):  # rounds fp32 -> bf16 differently
    """The normalised value is rounded to bf16 before the weight multiplies it, as LlamaRMSNorm does:
    in bf16 the outputs are equal but for the mean's summation order (nearly all bit-equal)."""
    monkeypatch.setattr(_rmsnorm, "_use_triton", lambda t: path == "triton")
    gen = torch.Generator().manual_seed(3)
    norm = LlamaRMSNorm(256).to(DEV, torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(256, generator=gen))
        x = torch.randn(64, 256, generator=gen).to(DEV, torch.bfloat16)
        y, rstd = _rmsnorm.rmsnorm_forward(x, norm.weight, norm.variance_epsilon)
        ref = norm(x)
    assert rstd.dtype == torch.float32 and rstd.shape == (64,)
    assert (y == ref).float().mean() > 0.99


def test_only_llama_code_qualifies():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    assert is_llama_rmsnorm(Qwen2RMSNorm(8))  # a "Copied from" twin: the same code
    assert not is_llama_rmsnorm(GemmaRMSNorm(8))  # (1 + w) scaling
    assert not is_llama_rmsnorm(torch.nn.LayerNorm(8))
