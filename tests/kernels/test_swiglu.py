"""SwiGLU's elementwise forward and in-place backward against torch autograd.

Both paths: the Triton kernel (interpreter on CPU, tests/conftest.py) and the chunked torch fallback.
"""

from __future__ import annotations

import pytest
import torch

from sft_plugins.kernels import _swiglu
from sft_plugins.kernels._backend import triton_runs_on

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PATHS = ["triton", "torch"] if triton_runs_on(torch.device(DEV)) else ["torch"]
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5), (300, 17), (2100, 3), (64, 64)])  # tail only; blocks + tail; blocks
@pytest.mark.parametrize("write_h", [True, False])
def test_swiglu_forward_and_inplace_backward(path, dtype, shape, write_h, monkeypatch):
    monkeypatch.setattr(_swiglu, "_use_triton", lambda t: path == "triton")
    gen = torch.Generator().manual_seed(0)
    e, g, dh = (torch.randn(shape, generator=gen).mul(3).to(DEV, dtype) for _ in range(3))
    ef, gf = e.float().clone().requires_grad_(), g.float().clone().requires_grad_()
    ref = torch.nn.functional.silu(ef) * gf
    ref.backward(dh.float())
    tol = TOL[dtype]
    h = _swiglu.swiglu_forward(e, g)
    torch.testing.assert_close(h.float(), ref.detach(), rtol=tol, atol=tol)
    dh_before = dh.clone()
    _swiglu.swiglu_backward_(e, g, dh, write_h=write_h)
    torch.testing.assert_close(e.float(), ef.grad, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(g.float(), gf.grad, rtol=tol, atol=tol * 10)
    if write_h:
        torch.testing.assert_close(dh.float(), ref.detach(), rtol=tol, atol=tol)
    else:
        assert torch.equal(dh, dh_before)
