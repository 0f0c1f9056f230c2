"""The 8-bit blockwise AdamW kernel against its torch reference and against bitsandbytes' own step.

On CPU the kernel runs in the Triton interpreter (tests/conftest.py sets it); shapes stay small.
"""

from __future__ import annotations

import os

import pytest
import torch

from sft_plugins.kernels import _triton_adam8bit as k

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1")
HP = dict(beta1=0.9, beta2=0.999, eps=1e-8, lr=1e-2)


def _maps():
    import bitsandbytes.functional as F

    return (F.create_dynamic_map(signed=True).to(DEV).float(), F.create_dynamic_map(signed=False).to(DEV).float())


def _state(n: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen).to(DEV, dtype)
    blocks = -(-n // k.QUANT_BLOCK)
    return dict(param=p, state1=torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).to(DEV),
                state2=torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).to(DEV),
                absmax1=torch.rand(blocks, generator=gen).to(DEV) * 0.1,
                absmax2=torch.rand(blocks, generator=gen).to(DEV) * 0.01)


def _clone(st):
    return {key: t.clone() for key, t in st.items()}


def _assert_same_state(a, b, *, absmax_rtol, codes_apart, param_rtol, param_atol):
    """Block scales to ``absmax_rtol``; codes equal but for a fraction ``codes_apart`` one code apart (values
    on a rounding midpoint: division rounding may differ by an ulp); parameters: fp32 to the given
    tolerances, bf16 within one unit in the last place."""
    torch.testing.assert_close(a["absmax1"], b["absmax1"], rtol=absmax_rtol, atol=0)
    torch.testing.assert_close(a["absmax2"], b["absmax2"], rtol=absmax_rtol, atol=0)
    for key in ("state1", "state2"):
        diff = (a[key].int() - b[key].int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < codes_apart, key
    fp32 = a["param"].dtype == torch.float32
    torch.testing.assert_close(a["param"], b["param"], rtol=param_rtol if fp32 else 2**-7,
                               atol=param_atol if fp32 else 1e-7)


@needs_triton
@pytest.mark.parametrize("n", [256, 1000, 4096 + 77])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_kernel_matches_reference(n, dtype, weight_decay):
    q1, q2 = _maps()
    ours = _state(n, dtype)
    ref = _clone(ours)
    for step in (1, 2, 3):
        grad = torch.randn(n, generator=torch.Generator().manual_seed(step)).to(DEV, dtype) * 0.1
        if step == 2:
            grad[5] = float("nan")  # non-finite gradient: that value keeps its parameter, zero moments
            grad[-1] = float("inf")
        k.adam8bit_blockwise_step_(grad=grad, qmap1=q1, qmap2=q2, step=step, weight_decay=weight_decay, **HP, **ours)
        k.adam8bit_blockwise_step_reference_(grad=grad, qmap1=q1, qmap2=q2, step=step, weight_decay=weight_decay,
                                             **HP, **ref)
        _assert_same_state(ours, ref, absmax_rtol=1e-6, codes_apart=1e-3, param_rtol=2e-6, param_atol=1e-6)
    assert torch.isfinite(ours["param"]).all()


def _bnb_step(st, grad, q1, q2, step, weight_decay):
    import bitsandbytes.functional as F

    F.optimizer_update_8bit_blockwise("adam", grad, st["param"], st["state1"], st["state2"], HP["beta1"], HP["beta2"],
                                      0.0, 0.0, HP["eps"], step, HP["lr"], q1, q2, st["absmax1"], st["absmax2"],
                                      weight_decay=weight_decay)


@pytest.mark.skipif(DEV == "cpu", reason="bitsandbytes' CPU backend is other arithmetic (decay before the update, "
                    "no sign rule); the kernel we match is its CUDA one")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_follows_bitsandbytes(dtype):
    """The reference is bitsandbytes' CUDA arithmetic: 5 steps from zero state on the same gradients."""
    pytest.importorskip("bitsandbytes")
    q1, q2 = _maps()
    n = 3 * 256 + 40
    ref = dict(param=torch.randn(n, generator=torch.Generator().manual_seed(1)).to(DEV, dtype),
               state1=torch.full((n,), 127, dtype=torch.uint8, device=DEV),  # code of 0.0 in the signed map
               state2=torch.zeros(n, dtype=torch.uint8, device=DEV),
               absmax1=torch.zeros(4, device=DEV), absmax2=torch.zeros(4, device=DEV))
    bnb = _clone(ref)
    for step in range(1, 6):
        grad = torch.randn(n, generator=torch.Generator().manual_seed(10 + step)).to(DEV, dtype) * 0.1
        k.adam8bit_blockwise_step_reference_(grad=grad, qmap1=q1, qmap2=q2, step=step, weight_decay=0.01, **HP, **ref)
        _bnb_step(bnb, grad, q1, q2, step, 0.01)
    # 5 steps: a code one apart moves its value's later updates by ~1e-4 of an update (seen: 1.2e-6)
    _assert_same_state(ref, bnb, absmax_rtol=1e-5, codes_apart=5e-3, param_rtol=1e-5, param_atol=5e-6)


@needs_triton
def test_grouped_launch_equals_one_launch_per_tensor():
    """Tensors of several sizes, parameter dtypes and weight decays (one launch per dtype pair): the grouped
    kernel's parameters, codes and scales equal the one-tensor kernel's bit for bit, non-finite grads included."""
    q1, q2 = _maps()
    cases = [(256, torch.float32, 0.0), (1000, torch.float32, 0.1), (4096 + 77, torch.float32, 0.0),
             (3, torch.float32, 0.1), (2048 + 5, torch.bfloat16, 0.1), (300, torch.bfloat16, 0.0)]
    ours = [_state(n, dtype, seed=i) for i, (n, dtype, _) in enumerate(cases)]
    ref = [_clone(st) for st in ours]
    for step in (1, 2):
        grads = []
        for i, (n, dtype, _) in enumerate(cases):
            g = torch.randn(n, generator=torch.Generator().manual_seed(10 * step + i)).to(DEV, dtype) * 0.1
            if step == 2 and n > 5:
                g[5] = float("nan")
            grads.append(g)
        k.adam8bit_blockwise_step_grouped_(
            [k.Adam8bitUpdate(st["param"], g, st["state1"], st["state2"], st["absmax1"], st["absmax2"],
                              HP["beta1"], HP["beta2"], HP["eps"], step, HP["lr"], wd)
             for st, g, (_, _, wd) in zip(ours, grads, cases)], q1, q2)
        for st, g, (_, _, wd) in zip(ref, grads, cases):
            k.adam8bit_blockwise_step_(grad=g, qmap1=q1, qmap2=q2, step=step, weight_decay=wd, **HP, **st)
        for a, b in zip(ours, ref):
            for key in a:
                assert torch.equal(a[key], b[key]), key
