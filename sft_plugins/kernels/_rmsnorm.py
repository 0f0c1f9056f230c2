"""Llama-style RMSNorm, ``w * (x * rsqrt(mean(x²) + eps)).to(x.dtype)``, forward and backward (Triton;
torch on CPU), keeping only ``x`` and one fp32 ``rstd`` per row for the backward.

Used by the lean layer recompute (``smart_checkpointing`` option ``lean_norm``): eager autograd keeps the
fp32 copy of ``x`` (twice ``x``'s size in bf16) for each norm. Forward rounding follows transformers'
``LlamaRMSNorm`` (normalised value rounded to ``x``'s dtype before the weight multiplies it); the backward
is computed in fp32 registers. Works under ``TRITON_INTERPRET=1`` on CPU tensors; on CPU without it a
torch implementation in row chunks does the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import triton_runs_on

_TORCH_CHUNK_ROWS = 1024
_MAX_BLOCK = 65536


# no integer specialisation on the row counts: every padded batch shape would compile its own variant
@triton.jit(do_not_specialize=["n_rows", "rows_per_prog"])
def _rmsnorm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, eps, rows_per_prog,
                        BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    for i in range(rows_per_prog):
        row = tl.program_id(0).to(tl.int64) * rows_per_prog + i
        if row < n_rows:
            x = tl.load(x_ptr + row * n_cols + cols, mask=cmask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
            xn = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # HF rounds here, before the weight
            tl.store(y_ptr + row * n_cols + cols, (w * xn).to(y_ptr.dtype.element_ty), mask=cmask)
            tl.store(rstd_ptr + row, rstd)


@triton.jit(do_not_specialize=["n_rows", "rows_per_prog"])
def _rmsnorm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, rows_per_prog,
                        WANT_DW: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(rows_per_prog):
        row = tl.program_id(0).to(tl.int64) * rows_per_prog + i
        if row < n_rows:
            x = tl.load(x_ptr + row * n_cols + cols, mask=cmask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * n_cols + cols, mask=cmask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xn = x * rstd
            dxn = dy * w
            dx = rstd * (dxn - xn * (tl.sum(dxn * xn, axis=0) / n_cols))
            tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=cmask)
            if WANT_DW:
                dw += dy * xn.to(x_ptr.dtype.element_ty).to(tl.float32)
    if WANT_DW:
        tl.store(dw_ptr + tl.program_id(0).to(tl.int64) * n_cols + cols, dw, mask=cmask)


def _use_triton(t: torch.Tensor) -> bool:
    return triton_runs_on(t.device) and t.shape[-1] <= _MAX_BLOCK


def _grid(n_rows: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows per program): a few programs per SM, so the dW partial sums stay small. Rows per
    program is a runtime argument: a new batch shape must not compile a new kernel."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    per = max(1, -(-n_rows // target))
    return -(-n_rows // per), per


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


@torch.no_grad()
def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)``: ``y`` in ``x.dtype`` promoted with ``weight.dtype`` (as ``weight * xn`` in torch),
    ``rstd`` fp32, one per row of ``x`` (contiguous, normalised over the last dim)."""
    x2 = _rows(x)
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0] == 0:
        return y.view(x.shape), rstd
    if _use_triton(x2):
        programs, per = _grid(x2.shape[0], x.device)
        block = triton.next_power_of_2(x2.shape[1])
        _rmsnorm_fwd_kernel[(programs,)](x2, weight, y, rstd, x2.shape[0], x2.shape[1], eps, per,
                                         BLOCK=block, num_warps=_warps(block))
        return y.view(x.shape), rstd
    wf = weight.float()
    for xc, yc, rc in zip(x2.split(_TORCH_CHUNK_ROWS), y.split(_TORCH_CHUNK_ROWS), rstd.split(_TORCH_CHUNK_ROWS)):
        xf = xc.float()
        rc.copy_(torch.rsqrt(xf.pow(2).mean(-1) + eps))
        yc.copy_(wf * (xf * rc[:, None]).to(x.dtype).float())
    return y.view(x.shape), rstd


@torch.no_grad()
def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, *,
                     want_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dx, dw)`` for :func:`rmsnorm_forward`: ``dx`` in ``x.dtype``, ``dw`` (fp32 sum over rows, or None)."""
    x2, dy2 = _rows(x), _rows(dy).contiguous()
    dx = torch.empty_like(x2)
    n_rows, n_cols = x2.shape
    if n_rows == 0:
        return dx.view(x.shape), torch.zeros(n_cols, dtype=torch.float32, device=x.device) if want_dw else None
    if _use_triton(x2):
        programs, per = _grid(n_rows, x.device)
        block = triton.next_power_of_2(n_cols)
        partial = torch.empty((programs, n_cols) if want_dw else (1,), dtype=torch.float32, device=x.device)
        _rmsnorm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, partial, n_rows, n_cols, per,
                                         WANT_DW=want_dw, BLOCK=block, num_warps=_warps(block))
        return dx.view(x.shape), partial.sum(0) if want_dw else None
    wf = weight.float()
    dw = torch.zeros(n_cols, dtype=torch.float32, device=x.device) if want_dw else None
    for xc, dyc, rc, dxc in zip(x2.split(_TORCH_CHUNK_ROWS), dy2.split(_TORCH_CHUNK_ROWS),
                                rstd.split(_TORCH_CHUNK_ROWS), dx.split(_TORCH_CHUNK_ROWS)):
        xn = xc.float() * rc[:, None]
        dyf = dyc.float()
        dxn = dyf * wf
        dxc.copy_(rc[:, None] * (dxn - xn * (dxn * xn).mean(-1, keepdim=True)))
        if dw is not None:
            dw += (dyf * xn.to(x.dtype).float()).sum(0)
    return dx.view(x.shape), dw
