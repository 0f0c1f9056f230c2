"""Triton row kernel: softmax statistics, per-token loss and d(logits) for one chunk of logits.

The big products (logits = h @ W^T, dH = dlogits @ W, dW += dlogits^T @ h) run on cuBLAS through
``torch.mm``; these kernels are the memory-bound part in between. One program handles one row of the
chunk, in place (no second [C, V] buffer exists):

* ``_ce_rows_one_pass_kernel`` (gradients wanted; no bias grad, no label smoothing, bf16/fp32): one
  read and one write of the row; it stores d(logits) up to a per-row factor, which it returns.
* ``_ce_rows_kernel``: pass 1 streams the row and keeps an online max / sum-exp (fp32), plus what
  entropy and label smoothing need; pass 2 (only when gradients are wanted) streams it again and
  overwrites it with d(loss_row)/d(logits).

Works unchanged under ``TRITON_INTERPRET=1`` on CPU tensors (only elementwise ops and reductions;
no ``tl.dot``, no libdevice: tanh is written with ``tl.sigmoid`` there because libdevice's import path
differs between Triton 3.6 and 3.9 and does not exist in the interpreter; on CUDA it is the hardware
``tanh.approx.f32`` through inline PTX).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from ._backend import ce_setting, triton_interpret


@triton.jit
def _tanh(x, HW: tl.constexpr):
    # With softcap the row kernel is bound by the special-function unit (MUFU): how tanh is made matters.
    # HW (CUDA, bf16/fp16 logits): the hardware tanh.approx.f32, one MUFU op, relative error ~2^-11, below
    # the bf16 rounding of the logit it is applied to; on the H200 it cut the softcap row kernel by 30% and
    # left the loss error at 6.8e-6 vs 6.5e-6 with wide logits (docs/benchmarks.md, fused_ce).
    # Else (fp32, interpreter, ROCm, SFT_PLUGINS_CE_TANH=0): 2*sigmoid(2x) - 1, abs. error ~1e-7.
    if HW:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _logit(x, logit_scale, u_scale, softcap, HAS_SOFTCAP: tl.constexpr, HW_TANH: tl.constexpr):
    """The logit the loss sees, z, and dz/dx without the logit scale (that is in the row's grad factor):
    z = softcap * tanh(x * logit_scale / softcap) and 1 - tanh^2 with softcap, else x * logit_scale and 1."""
    if HAS_SOFTCAP:
        th = _tanh(x * u_scale, HW_TANH)
        z = softcap * th
        dz = 1.0 - th * th
    else:
        z = x * logit_scale
        dz = 1.0
    return z, dz


@triton.jit
def _row_start(logits_ptr, stride_row, rows_ptr, labels_ptr, row):
    """The chunk row's index into the full-N outputs, its label, and its logits' first element."""
    out_row = tl.load(rows_ptr + row)
    label = tl.load(labels_ptr + out_row).to(tl.int64)
    base = logits_ptr + (tl.full([], 0, tl.int64) + row) * stride_row  # int64 offsets
    return out_row, label, base


@triton.jit
def _grad_factor(out_row, logit_scale, grad_scale, scale_ptr, row_scale_ptr,
                 HAS_SCALE_PTR: tl.constexpr, HAS_ROW_SCALE: tl.constexpr):
    """d(logits) = g * (p - onehot) * dz/dx: the logit scale, 1/denominator and upstream grad of a row."""
    g = logit_scale * grad_scale
    if HAS_SCALE_PTR:
        g = g * tl.load(scale_ptr).to(tl.float32)
    if HAS_ROW_SCALE:
        g = g * tl.load(row_scale_ptr + out_row).to(tl.float32)
    return g


@triton.jit
def _ce_rows_kernel(
    logits_ptr,  # [C, V] chunk (bf16/fp16/fp32); overwritten with d(loss)/d(logits) if WRITE_GRAD
    stride_row,
    rows_ptr,  # [C] int64: the chunk row's index into the full-N outputs and labels
    labels_ptr,  # [N] int: labels of the full batch
    bias_ptr,  # [V] or dummy
    row_scale_ptr,  # [N] fp32 per-token upstream grad (reduction="none", deferred mode) or dummy
    scale_ptr,  # 0-dim fp32 on the device (1 / num_items_in_batch) or dummy
    loss_ptr,  # [N] fp32 out: per-token loss
    ent_ptr,  # [N] fp32 out: entropy (WANT_STATS)
    top1_ptr,  # [N] uint8 out: label is the argmax (WANT_STATS)
    C,
    V,
    logit_scale,
    u_scale,  # logit_scale / softcap: a multiply instead of a (MUFU) divide per element
    grad_scale,  # host-known factor of d(logits), e.g. 1 / n_valid for "mean"
    softcap,
    smoothing,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_SCALE_PTR: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    WANT_STATS: tl.constexpr,
    HW_TANH: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # rows are strided over the programs: with a grid of a few programs per SM the rows in flight
    # fit in L2, so pass 2 re-reads them from L2 instead of HBM; with grid == C it is one row each
    for row in range(tl.program_id(0), C, tl.num_programs(0)):
        out_row, label, base = _row_start(logits_ptr, stride_row, rows_ptr, labels_ptr, row)

        # ---- pass 1: online max / sum-exp (and sum p*z, sum z) in fp32 ---------------------
        m = float("-inf")
        s = 0.0
        t = 0.0  # sum exp(z - m) * z, for the entropy
        sz = 0.0  # sum z, for label smoothing
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            z, _dz = _logit(x, logit_scale, u_scale, softcap, HAS_SOFTCAP, HW_TANH)
            zm = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(zm, 0))
            e = tl.exp(zm - m_new)  # masked lanes: exp(-inf) = 0
            alpha = tl.exp(m - m_new)
            s = s * alpha + tl.sum(e, 0)
            if WANT_STATS:
                t = t * alpha + tl.sum(tl.where(mask, e * z, 0.0), 0)
            if SMOOTH:
                sz += tl.sum(tl.where(mask, z, 0.0), 0)
            m = m_new
        lse = m + tl.log(s)

        # the label's logit, transformed the same way
        xy = tl.load(base + label).to(tl.float32)
        if HAS_BIAS:
            xy += tl.load(bias_ptr + label).to(tl.float32)
        zy, _dzy = _logit(xy, logit_scale, u_scale, softcap, HAS_SOFTCAP, HW_TANH)
        if SMOOTH:
            loss = lse - (1.0 - smoothing) * zy - smoothing * sz / V
        else:
            loss = lse - zy
        tl.store(loss_ptr + out_row, loss)
        if WANT_STATS:
            tl.store(ent_ptr + out_row, lse - t / s)
            # argmax == label, up to exact ties (a tie counts as a hit)
            tl.store(top1_ptr + out_row, (zy >= m).to(tl.uint8))

        # ---- pass 2: d(loss_row)/d(logits) = (p - eps/V - (1-eps)*onehot) * dz/dx ----------
        if WRITE_GRAD:
            g = _grad_factor(out_row, logit_scale, grad_scale, scale_ptr, row_scale_ptr, HAS_SCALE_PTR, HAS_ROW_SCALE)
            n_blocks = tl.cdiv(V, BLOCK_V)
            for i in range(0, n_blocks):
                # backwards: the end of the row, read last in pass 1, is the likeliest still in L2
                start = (n_blocks - 1 - i) * BLOCK_V if REVERSE else i * BLOCK_V
                offs = start + tl.arange(0, BLOCK_V)
                mask = offs < V
                x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    x += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                z, dz = _logit(x, logit_scale, u_scale, softcap, HAS_SOFTCAP, HW_TANH)
                d = tl.exp(z - lse)
                if SMOOTH:
                    d = d - smoothing / V
                    d = tl.where(offs == label, d - (1.0 - smoothing), d)
                else:
                    d = tl.where(offs == label, d - 1.0, d)
                d = d * dz * g
                tl.store(base + offs, d.to(logits_ptr.dtype.element_ty), mask=mask)


# A row whose max rises this far above the reference its values are stored against is re-based: the
# stored exp(z - ref) then stays below e^60 and its sum below V * e^60 (fp32 and bf16 reach e^88).
_REBASE = 60.0


@triton.jit
def _ce_rows_one_pass_kernel(
    logits_ptr,  # [C, V] chunk (bf16/fp32); overwritten with s_row * d(loss_row)/d(logits) / g_row
    stride_row,
    rows_ptr,  # [C] int64: the chunk row's index into the full-N outputs and labels
    labels_ptr,  # [N] int: labels of the full batch
    row_scale_ptr,  # [N] fp32 per-token upstream grad or dummy
    scale_ptr,  # 0-dim fp32 on the device (1 / num_items_in_batch) or dummy
    loss_ptr,  # [N] fp32 out: per-token loss
    ent_ptr,  # [N] fp32 out: entropy (WANT_STATS)
    top1_ptr,  # [N] uint8 out: label is the argmax (WANT_STATS)
    rfac_ptr,  # [C] fp32 out: the row's factor g_row / s_row that turns the stored values into d(logits)
    C,
    V,
    logit_scale,
    u_scale,
    grad_scale,
    softcap,
    rebase,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_SCALE_PTR: tl.constexpr,
    WANT_STATS: tl.constexpr,
    HW_TANH: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # One read and one write of the row instead of two reads and a write. The softmax needs the row's
    # log-sum-exp before a probability can be written; unnormalised values do not: exp(z - ref) against
    # a reference known from the first block, times dz/dx, and the row's 1/sum goes into a per-row
    # factor that the host applies to the (small) GEMM operands/outputs instead: dH = diag(r) (E @ W),
    # dW = E^T @ diag(r) h. A row whose max later climbs more than `rebase` above the reference
    # (rare: the first block already holds thousands of logits) rescales what it wrote and moves on.
    for row in range(tl.program_id(0), C, tl.num_programs(0)):
        out_row, label, base = _row_start(logits_ptr, stride_row, rows_ptr, labels_ptr, row)
        xy = tl.load(base + label).to(tl.float32)  # before the pass overwrites it
        zy, dy = _logit(xy, logit_scale, u_scale, softcap, HAS_SOFTCAP, HW_TANH)

        ref = float("-inf")
        m = float("-inf")
        s = 0.0
        t = 0.0  # sum exp(z - ref) * z, for the entropy
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            z, dz = _logit(x, logit_scale, u_scale, softcap, HAS_SOFTCAP, HW_TANH)
            zm = tl.where(mask, z, float("-inf"))
            m = tl.maximum(m, tl.max(zm, 0))
            if m > ref + rebase:  # the first block, or a rare jump: re-base what is written so far
                alpha = tl.exp(ref - m)
                s = s * alpha
                t = t * alpha
                tl.debug_barrier()  # lanes re-read their own stores; a barrier anyway (first block and rare jumps)
                for prev in range(0, start, BLOCK_V):  # only full blocks precede this one
                    po = prev + tl.arange(0, BLOCK_V)
                    old = tl.load(base + po).to(tl.float32)
                    tl.store(base + po, (old * alpha).to(logits_ptr.dtype.element_ty))
                ref = m
            e = tl.exp(zm - ref)  # masked lanes: 0
            tl.store(base + offs, (e * dz).to(logits_ptr.dtype.element_ty), mask=mask)
            s += tl.sum(e, 0)
            if WANT_STATS:
                t += tl.sum(tl.where(mask, e * z, 0.0), 0)
        lse = ref + tl.log(s)
        tl.store(loss_ptr + out_row, lse - zy)
        if WANT_STATS:
            tl.store(ent_ptr + out_row, lse - t / s)
            tl.store(top1_ptr + out_row, (zy >= m).to(tl.uint8))  # a tie counts as a hit
        g = _grad_factor(out_row, logit_scale, grad_scale, scale_ptr, row_scale_ptr, HAS_SCALE_PTR, HAS_ROW_SCALE)
        tl.store(rfac_ptr + row, g / s)  # s >= 1: the max element contributes exp(m - ref) >= 1
        # the label's entry, p_y - 1 in units of 1/s; another lane wrote it in the pass: wait for it
        tl.debug_barrier()
        tl.store(base + label, ((tl.exp(zy - ref) - s) * dy).to(logits_ptr.dtype.element_ty))


# (BLOCK_V, warps) the one-pass kernel chooses from at run time on CUDA, per card and row shape: the best
# program shape follows the card's memory system (H200: 4096/4 plain, 4096/8 softcap; docs/fused_ce_notes.md)
ONE_PASS_CONFIGS = ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 32))
_one_pass_tuned: Any = None


def _bench_once_each(fn: Callable[[], Any], quantiles: Any = None, **_: Any) -> Any:
    """Median-free timing for the tuner: 5 runs between two CUDA events, no L2-flush buffer (Triton's
    ``do_bench`` allocates 256 MB for it; a chunk is already several times the L2)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / 5
    return [ms] * len(quantiles) if quantiles else ms


def _one_pass_kernel_tuned() -> Any:
    """The one-pass kernel behind Triton's autotuner (on first use): the first chunk of each row shape times
    :data:`ONE_PASS_CONFIGS`, restoring the chunk from a copy between runs (the kernel writes in place: one
    chunk-sized copy, within the 240 MiB workspace, lives for that first call), and keeps the fastest."""
    global _one_pass_tuned
    if _one_pass_tuned is None:
        configs = [triton.Config({"BLOCK_V": b}, num_warps=w) for b, w in ONE_PASS_CONFIGS]
        _one_pass_tuned = triton.autotune(
            configs, key=["V", "HAS_SOFTCAP", "WANT_STATS", "HW_TANH"], restore_value=["logits_ptr"],
            do_bench=_bench_once_each)(_ce_rows_one_pass_kernel)
    return _one_pass_tuned


def _choose_at_run_time(logits: torch.Tensor) -> bool:
    """CUDA one-pass launches choose their shape at run time unless SFT_PLUGINS_CE_TUNE=0 or
    SFT_PLUGINS_CE_BLOCK_V / _NUM_WARPS fix it."""
    return (logits.is_cuda and not triton_interpret() and ce_setting("TUNE") == "1"
            and not int(ce_setting("BLOCK_V")) and not int(ce_setting("NUM_WARPS")))


def _launch_config(V: int, one_pass: bool, softcap: bool, interpret: bool) -> tuple[int, int]:
    """(BLOCK_V, warps) of a row program; SFT_PLUGINS_CE_BLOCK_V / _NUM_WARPS override."""
    if interpret:  # the interpreter's cost grows with loop trips: the whole (small) row in one block
        block, warps = min(triton.next_power_of_2(V), 1 << 14), 4
    elif one_pass:
        # H200 (docs/benchmarks.md, fused_ce): small programs, many rows in flight
        # per SM: 4096/4 plain 0.131 ms vs 0.171 at 16384/32 ([922, 128256]); softcap 4096/8 0.163 vs 0.224
        block, warps = min(triton.next_power_of_2(V), 4096), 8 if softcap else 4
    else:
        # two passes: 16384-wide blocks with 32 warps were the fastest, plain and softcap
        # (H200; docs/fused_ce_notes.md)
        block = min(triton.next_power_of_2(V), 1 << 14)
        warps = max(4, min(32, block // 512))
    block = int(ce_setting("BLOCK_V")) or block
    warps = int(ce_setting("NUM_WARPS")) or warps
    return block, warps


def ce_rows_triton(
    logits: torch.Tensor,
    rows: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    loss_out: torch.Tensor,
    ent_out: torch.Tensor | None,
    top1_out: torch.Tensor | None,
    *,
    grad_scale: float,
    scale_t: torch.Tensor | None,
    logit_scale: float,
    softcap: float | None,
    smoothing: float,
    write_grad: bool,
    rfac_out: torch.Tensor | None = None,
) -> None:
    """Fill loss/entropy/top1 at ``rows`` and (optionally) turn ``logits`` into d(logits) in place.

    With ``rfac_out`` ([C] fp32; needs write_grad, no bias, no smoothing, bf16/fp32 logits) the row is
    read once: ``logits`` becomes d(logits) up to a per-row factor, which goes to ``rfac_out``."""
    C, V = logits.shape
    if C == 0:
        return
    assert logits.stride(1) == 1
    interpret = triton_interpret()
    want_stats = ent_out is not None
    dummy = loss_out  # never read when the matching flag is off
    grid = C
    per_sm = int(ce_setting("PROGRAMS_PER_SM"))
    if per_sm > 0:
        sms = torch.cuda.get_device_properties(logits.device).multi_processor_count if logits.is_cuda else 1
        grid = min(C, per_sm * sms)
    # the approximation only where it is below the rounding of the logits themselves (bf16/fp16)
    hw_tanh = (bool(softcap) and logits.dtype != torch.float32 and not interpret and torch.version.hip is None
               and ce_setting("TANH") == "1")
    u_scale = float(logit_scale) / float(softcap) if softcap else 1.0  # a multiply instead of a divide
    cap = float(softcap) if softcap else 1.0
    if rfac_out is not None:
        assert write_grad and bias is None and not smoothing and logits.dtype != torch.float16
        args = (logits, logits.stride(0), rows, labels,
                row_scale if row_scale is not None else dummy,
                scale_t if scale_t is not None else dummy,
                loss_out, ent_out if want_stats else dummy, top1_out if want_stats else dummy, rfac_out,
                C, V, float(logit_scale), u_scale, float(grad_scale), cap, _REBASE)
        flags = dict(HAS_SOFTCAP=bool(softcap), HAS_ROW_SCALE=row_scale is not None,
                     HAS_SCALE_PTR=scale_t is not None, WANT_STATS=want_stats, HW_TANH=hw_tanh)
        if _choose_at_run_time(logits):
            _one_pass_kernel_tuned()[(grid,)](*args, **flags)
        else:
            block, num_warps = _launch_config(V, True, bool(softcap), interpret)
            _ce_rows_one_pass_kernel[(grid,)](*args, **flags, BLOCK_V=block, num_warps=num_warps)
        return
    block, num_warps = _launch_config(V, False, bool(softcap), interpret)
    _ce_rows_kernel[(grid,)](
        logits,
        logits.stride(0),
        rows,
        labels,
        bias if bias is not None else dummy,
        row_scale if row_scale is not None else dummy,
        scale_t if scale_t is not None else dummy,
        loss_out,
        ent_out if want_stats else dummy,
        top1_out if want_stats else dummy,
        C,
        V,
        float(logit_scale),
        u_scale,
        float(grad_scale),
        cap,
        float(smoothing),
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=bool(softcap),
        SMOOTH=smoothing != 0.0,
        HAS_ROW_SCALE=row_scale is not None,
        HAS_SCALE_PTR=scale_t is not None,
        WRITE_GRAD=write_grad,
        WANT_STATS=want_stats,
        HW_TANH=hw_tanh,
        # backwards pass 2 reads part of the row from L2: -25% time plain; with softcap it was slower
        REVERSE=(ce_setting("REVERSE") or ("0" if softcap else "1")) == "1",
        BLOCK_V=block,
        num_warps=num_warps,
    )


@triton.jit
def _scale_kernel(x_ptr, g_ptr, n, BLOCK: tl.constexpr):
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:  # device-side early exit: the usual loss.backward() (g == 1) moves no bytes
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        tl.store(x_ptr + offs, (x.to(tl.float32) * g).to(x_ptr.dtype.element_ty), mask=mask)


def scale_inplace_triton(x: torch.Tensor, g: torch.Tensor) -> None:
    """x *= g for a 0-dim device tensor g, without a host sync and without traffic when g == 1."""
    assert x.is_contiguous()
    n = x.numel()
    if n == 0:
        return
    interpret = triton_interpret()
    block = min(triton.next_power_of_2(n), 1 << 16) if interpret else 8192
    _scale_kernel[(triton.cdiv(n, block),)](x, g.float().reshape(()), n, BLOCK=block, num_warps=8)
