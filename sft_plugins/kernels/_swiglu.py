"""SwiGLU's elementwise part, ``h = silu(e) * g``, forward and an in-place backward (Triton; torch on CPU).

Used by the lean MLP recompute (``smart_checkpointing`` option ``lean_mlp``): its backward overwrites
``e`` with d(loss)/de and ``g`` with d(loss)/dg, and may overwrite ``dh`` with ``h`` (needed once more for
the down projection's weight gradients), so no new [tokens, intermediate] tensor is allocated.
Math in fp32 registers, one pass over memory. Works under ``TRITON_INTERPRET=1`` on CPU tensors; on CPU
without it a torch implementation in row chunks does the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import triton_runs_on

_BLOCK = 2048
_TORCH_CHUNK_ROWS = 256


# One compiled variant per kernel for every batch shape (``n`` not specialised), launched twice: the whole
# blocks without a mask, then the tail, if any, with one. A mask against an ``n`` whose divisibility Triton
# does not know limits loads and stores to one element each (triton-lang/triton#785); without a mask they
# are vectorised.
@triton.jit(do_not_specialize=["n"])
def _swiglu_fwd_kernel(e_ptr, g_ptr, h_ptr, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n if MASKED else None
    other = 0.0 if MASKED else None
    e = tl.load(e_ptr + offs, mask=mask, other=other).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=other).to(tl.float32)
    h = e * tl.sigmoid(e) * g
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n"])
def _swiglu_bwd_kernel(e_ptr, g_ptr, dh_ptr, n, WRITE_H: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n if MASKED else None
    other = 0.0 if MASKED else None
    e = tl.load(e_ptr + offs, mask=mask, other=other).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=other).to(tl.float32)
    dh = tl.load(dh_ptr + offs, mask=mask, other=other).to(tl.float32)
    se = tl.sigmoid(e)
    silu = e * se
    de = dh * g * se * (1.0 + e * (1.0 - se))
    tl.store(e_ptr + offs, de.to(e_ptr.dtype.element_ty), mask=mask)
    tl.store(g_ptr + offs, (dh * silu).to(g_ptr.dtype.element_ty), mask=mask)
    if WRITE_H:
        tl.store(dh_ptr + offs, (silu * g).to(dh_ptr.dtype.element_ty), mask=mask)


def _launch(kernel: object, tensors: tuple[torch.Tensor, ...], n: int, **constexprs: object) -> None:
    """Whole blocks unmasked, then the tail (a view starting on a block boundary: aligned) masked."""
    whole = n // _BLOCK
    if whole:
        kernel[(whole,)](*tensors, whole * _BLOCK, BLOCK=_BLOCK, MASKED=False, num_warps=8, **constexprs)
    if n > whole * _BLOCK:
        tail = tuple(t.view(-1)[whole * _BLOCK:] for t in tensors)
        kernel[(1,)](*tail, n - whole * _BLOCK, BLOCK=_BLOCK, MASKED=True, num_warps=8, **constexprs)


def _use_triton(t: torch.Tensor) -> bool:
    return triton_runs_on(t.device)


@torch.no_grad()
def swiglu_forward(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``silu(e) * g`` in a new tensor (e, g contiguous, same shape and dtype)."""
    h = torch.empty_like(e)
    n = e.numel()
    if n == 0:
        return h
    if _use_triton(e):
        _launch(_swiglu_fwd_kernel, (e, g, h), n)
        return h
    for ec, gc, hc in zip(*(t.view(-1, t.shape[-1]).split(_TORCH_CHUNK_ROWS) for t in (e, g, h))):
        ef = ec.float()
        hc.copy_(torch.nn.functional.silu(ef) * gc.float())
    return h


@torch.no_grad()
def swiglu_backward_(e: torch.Tensor, g: torch.Tensor, dh: torch.Tensor, *, write_h: bool) -> None:
    """In place: ``e`` <- dL/de, ``g`` <- dL/dg for ``h = silu(e) * g`` and ``dh = dL/dh``; with ``write_h``
    also ``dh`` <- ``h`` (each element is read before it is written)."""
    n = e.numel()
    if n == 0:
        return
    if _use_triton(e):
        _launch(_swiglu_bwd_kernel, (e, g, dh), n, WRITE_H=write_h)
        return
    for ec, gc, dc in zip(*(t.view(-1, t.shape[-1]).split(_TORCH_CHUNK_ROWS) for t in (e, g, dh))):
        # copies even for fp32 inputs: the three buffers are overwritten below
        ef, gf, df = (t.to(torch.float32, copy=True) for t in (ec, gc, dc))
        se = torch.sigmoid(ef)
        silu = ef * se
        ec.copy_(df * gf * se * (1.0 + ef * (1.0 - se)))
        gc.copy_(df * silu)
        if write_h:
            dc.copy_(silu * gf)
