"""Autograd Function and chunk planner for the fused linear + cross-entropy head.

Design (a "hybrid" head): the valid (non-ignored) rows are compacted and walked in chunks of C rows.
Per chunk, cuBLAS computes logits [C, V] into one reused buffer; one fused row kernel (Triton, or
its torch twin) computes LSE / loss / entropy / top-1 and overwrites the buffer with d(logits); then
cuBLAS computes dH_chunk = dlogits @ W and, if W is trainable, dW += dlogits^T @ h_chunk.

* One pass (the default for bf16/fp32 without bias grads or label smoothing): the row kernel reads
  each logit once and writes exp(z - ref) * dz/dx against a reference from the row's first block,
  the row's g/sum going to a per-row factor r; dH_chunk = diag(r) (E @ W) and dW += E^T (diag(r) h),
  so the factor touches only [C, H] tensors. Two passes (read, read + write) otherwise.

* Eager gradients: for reduction mean/sum (and for "none" when only hidden needs a gradient) every
  gradient is produced in the forward, with 1/denominator already folded into d(logits); backward
  only multiplies by grad_output, through a kernel that exits on the device when it is 1 (no sync,
  no bytes for a plain loss.backward()). A step costs 2 GEMMs with a frozen W (LoRA) and 3 with a
  trainable W, each over the valid rows only.
* Deferred gradients: reduction "none" with a trainable W or bias needs a per-token upstream grad
  inside the dW sum, so the forward computes losses only and the backward recomputes the logits.
* Memory: the workspace is one [C, V] logits buffer plus two [C, H] row buffers; C is planned from
  the shape, the dtype and the free device memory (``_workspace_budget``), never the N x V logits.
* dW accumulation: inside each chunk cuBLAS accumulates over the chunk's C rows in fp32. Across
  chunks, an fp32 [V, H] accumulator is used when W is fp32, when asked for (``dw_accum="fp32"``),
  or ("auto") when it fits half the workspace budget; otherwise partial sums are added in W's dtype
  (one rounding per chunk, ~N/C of them) - an fp32 accumulator for a 128k x 4k head is 2 GB,
  eight times the memory budget. docs/fused_ce_notes.md gives the measured error.
* Host syncs: one, the number of valid rows (it sizes the loop). It is copied to pinned memory behind the
  first chunk's GEMM and read after that is queued, so the GPU does not idle for it on large batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ._backend import ce_setting, triton_runs_on

# The project's target for extra peak memory is 256 MiB; leave room for the per-token vectors.
_DEFAULT_WORKSPACE_CAP = 240 << 20
# Fraction of the currently available device memory the workspace may take.
_FREE_MEMORY_FRACTION = 8


class CEStats(NamedTuple):
    """Result of :func:`fused_linear_cross_entropy_stats`."""

    loss: torch.Tensor  # reduced loss, or per-token [N] fp32 (0 at ignored rows) for "none"
    entropy: torch.Tensor  # [N] fp32, detached, 0 at ignored rows
    is_top1: torch.Tensor  # [N] bool, detached, False at ignored rows


@dataclass(frozen=True)
class _Opts:
    ignore_index: int
    reduction: str
    softcap: float | None
    logit_scale: float
    smoothing: float
    backend: str
    compute_dtype: torch.dtype
    chunk_rows: int | None
    dw_accum: str
    want_stats: bool
    need_h: bool
    need_w: bool
    need_b: bool


def _pick_backend(device: torch.device, requested: str | None) -> str:
    choice = requested or ce_setting("BACKEND")
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown backend {choice!r}; use 'auto', 'triton' or 'torch'")
    if choice != "auto":
        return choice
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton" if triton_runs_on(device) else "torch"


def _row_fn(backend: str) -> Callable[..., None]:
    if backend == "triton":
        from ._triton_ce import ce_rows_triton  # lazy: TRITON_INTERPRET is read at decoration

        return ce_rows_triton
    from ._torch_ce import ce_rows_torch

    return ce_rows_torch


def _workspace_budget(device: torch.device) -> int:
    env = ce_setting("WORKSPACE_MB")
    if env:
        return int(float(env) * (1 << 20))
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)  # ~17 us on the H200
        if free >= _DEFAULT_WORKSPACE_CAP * _FREE_MEMORY_FRACTION:
            return _DEFAULT_WORKSPACE_CAP
        # tight: count the allocator's cached blocks too. Only here: the allocator's statistics cost
        # ~350 us of host time (the GPU idles meanwhile; docs/benchmarks.md, fused_ce)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return max(1 << 20, min(_DEFAULT_WORKSPACE_CAP, (free + cached) // _FREE_MEMORY_FRACTION))
    return _DEFAULT_WORKSPACE_CAP


def _max_chunk_rows(V: int, H: int, elt: int, backend: str, budget: int) -> int:
    """The most rows a chunk may have: its [C, V] logits and two [C, H] row buffers within the budget."""
    per_row = V * elt + 2 * H * elt + 32
    if backend == "torch":
        per_row += 4 * V * 4  # fp32 temporaries of the torch row path
    return max(1, budget // per_row)


def _balanced_rows(n: int, rows: int) -> int:
    """Chunk size for n rows in as few chunks of at most ``rows`` as possible, balanced, rounded up to a
    multiple of 8 within ``rows`` (tile-sized multiples, 64-256, were no faster on the H200: docs/fused_ce_notes.md)."""
    size = math.ceil(n / math.ceil(n / rows))
    return min(rows, -(-size // 8) * 8) if size >= 8 else size


def _plan_chunk_rows(n: int, V: int, H: int, elt: int, backend: str, budget: int) -> int:
    """Rows per chunk: as many as the budget allows (bigger GEMMs, fewer dW roundings), balanced."""
    rows = min(n, _max_chunk_rows(V, H, elt, backend, budget))
    return max(n, 1) if n <= rows else _balanced_rows(n, rows)


def _dh_split(rows: int, H: int, V: int, w: torch.Tensor, leftover: int) -> int:
    """Manual split-K factor for dH = dlogits @ W ([C, V] x [V, H]: huge K, few output tiles).

    Split only while the output has less than one wave of tiles and its [S, C, H] partials (+ an
    fp32 sum) fit in what the workspace budget leaves after the logits buffer.
    """
    # Off by default: on the H200, cuBLAS's own choice for the few-tile dH GEMM was as fast or
    # faster (gemma2-2b frozen: 33.1 ms unsplit vs 34.8 ms split 2; docs/fused_ce_notes.md).
    env = ce_setting("DH_SPLIT")
    if env != "auto":
        return max(1, int(env))
    if not w.is_cuda or not w.is_contiguous():
        return 1
    sms = torch.cuda.get_device_properties(w.device).multi_processor_count
    tiles = math.ceil(rows / 128) * math.ceil(H / 256)  # cuBLAS's usual 128x256 Hopper tiles
    split, elt = 1, w.element_size()
    while (tiles * split < sms and split < 8 and V // (2 * split) >= 8192
           and rows * H * (2 * split * elt + 4) <= leftover):
        split *= 2
    return split


def _mm_dh(lg: torch.Tensor, w: torch.Tensor, split: int) -> torch.Tensor:
    """dlogits @ W; with split > 1, a strided batched GEMM over V-slices summed in fp32."""
    if split <= 1:
        return torch.mm(lg, w)
    c, V = lg.shape
    H = w.shape[1]
    vs = V // split
    a = lg.as_strided((split, c, vs), (vs, lg.stride(0), 1))
    b = w.as_strided((split, vs, H), (vs * H, H, 1))
    out = torch.bmm(a, b).sum(0, dtype=torch.float32)
    tail = split * vs
    if tail < V:
        out.addmm_(lg[:, tail:].float(), w[tail:].float())
    return out.to(lg.dtype)


def _scale_(t: torch.Tensor | None, g: torch.Tensor, backend: str) -> None:
    """t *= g (0-dim tensor) in place, with no host sync on CUDA."""
    if t is None or t.numel() == 0:
        return
    if t.is_cuda or backend == "triton":
        try:
            from ._triton_ce import scale_inplace_triton

            scale_inplace_triton(t, g)
            return
        except ImportError:
            pass
    if t.is_cuda or float(g) != 1.0:  # CPU: reading g is free
        t.mul_(g.to(t.device))


def _dw_acc_dtype(opts: _Opts, w_dtype: torch.dtype, V: int, H: int, budget: int) -> torch.dtype:
    cdt = opts.compute_dtype
    if w_dtype == torch.float32 or cdt == torch.float32:
        return torch.float32
    mode = opts.dw_accum
    if mode == "fp32":
        return torch.float32
    if mode == "native":
        return cdt
    return torch.float32 if V * H * 4 <= budget // 2 else cdt


def _add_dw(dw: torch.Tensor | None, lg: torch.Tensor, hc: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """dW += lg^T @ hc; the first chunk creates it."""
    if dw is None:
        dw = torch.mm(lg.t(), hc)  # cuBLAS: fp32 accumulation over the C rows
        return dw if dw.dtype == acc_dtype else dw.to(acc_dtype)
    if dw.dtype == lg.dtype:
        dw.addmm_(lg.t(), hc)  # partial sums added in W's dtype: one rounding a chunk
    else:
        dw.add_(torch.mm(lg.t(), hc))  # fp32 accumulator of per-chunk partials
    return dw


class _ValidRows:
    """The label mask's valid rows: a permutation with them first (in order), and their count, which the
    host reads only when the chunk loop needs it. On CUDA the count travels to pinned memory behind the
    kernels already queued, so the first chunk's GEMM is on the GPU before the host waits for it."""

    def __init__(self, labels: torch.Tensor, ignore_index: int) -> None:
        valid = labels != ignore_index
        self.total = labels.numel()
        self.order = torch.argsort((~valid).to(torch.uint8), stable=True)
        count = valid.sum()
        self._event: torch.cuda.Event | None = None
        self._host = count
        if count.is_cuda:
            self._host = torch.empty((), dtype=count.dtype, pin_memory=True)
            self._host.copy_(count, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def count(self) -> int:
        if self._event is not None:
            self._event.synchronize()  # the count's copy only, not the GEMMs queued after it
        return int(self._host)


def _chunk_bounds(n: int, first: int, rows: int) -> list[int]:
    """Chunk starts/ends over n rows: the first chunk as launched, the rest balanced, at most ``rows`` each."""
    bounds = [0, min(first, n)]
    rest = n - bounds[-1]
    if rest > 0:
        size = _balanced_rows(rest, rows)
        while bounds[-1] < n:
            bounds.append(min(bounds[-1] + size, n))
    return bounds


def _chunk_loop(
    h: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    rows_in: _ValidRows | torch.Tensor,
    opts: _Opts,
    w_dtype: torch.dtype,
    *,
    need_h: bool,
    need_w: bool,
    need_b: bool,
    row_scale: torch.Tensor | None,
    grad_scale: float | None,
    scale_t: torch.Tensor | None,
    loss_out: torch.Tensor,
    ent_out: torch.Tensor | None,
    top1_out: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Walk the valid rows in chunks. ``rows_in`` is the valid-row index, or a :class:`_ValidRows` whose
    count is read after the first chunk's GEMM is queued. ``grad_scale=None`` means 1 / the count ("mean").
    Returns dh, dw, db and the valid-row index."""
    N, H = h.shape
    V = w.shape[0]
    dev, cdt = h.device, h.dtype
    budget = _workspace_budget(dev)
    acc_dtype = _dw_acc_dtype(opts, w_dtype, V, H, budget) if need_w else cdt
    if need_w and acc_dtype != cdt:
        budget = max(budget - V * H * 4, 1 << 20)
    pending = isinstance(rows_in, _ValidRows)
    order = rows_in.order if pending else rows_in
    upper = rows_in.total if pending else rows_in.numel()
    elt = h.element_size()
    # Launch the first chunk (as large as allowed) before the count is known only in a batch of at least
    # 4 chunks: ignored rows could reach its GEMM only if more than 3/4 of the batch were ignored
    rows = opts.chunk_rows or _max_chunk_rows(V, H, elt, opts.backend, budget)
    early = pending and upper >= 4 * rows
    if not early:
        rows = 0  # planned below, for the count
    wt = w.t()
    buf = hc0 = None
    if early:
        buf = torch.empty(rows, V, dtype=cdt, device=dev)
        hc0 = h.index_select(0, order[:rows])
        torch.mm(hc0, wt, out=buf)
    n_valid = rows_in.count() if pending else upper
    idx = order[:n_valid]
    if not early:
        rows = min(opts.chunk_rows or _plan_chunk_rows(n_valid, V, H, elt, opts.backend, budget), n_valid)
    if grad_scale is None:
        grad_scale = 1.0 / max(n_valid, 1)  # all ignored -> 0 / 1 = 0, not NaN
    contiguous = n_valid == N  # no ignored rows: the order is the identity, slices instead of gathers
    dh = None
    if need_h:
        dh = (torch.empty if contiguous else torch.zeros)(N, H, dtype=cdt, device=dev)
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    dw: torch.Tensor | None = None
    write_grad = need_h or need_w or need_b
    # one read of each logit instead of two (the row kernel's docstring says how); not for what the
    # per-row factor cannot carry (bias grads, smoothing's dense term) nor fp16, whose range is too short
    one_pass = (write_grad and not need_b and not opts.smoothing and cdt != torch.float16
                and ce_setting("ONE_PASS") == "1")
    rfac = hs_buf = None
    if n_valid:
        if buf is None:
            buf = torch.empty(rows, V, dtype=cdt, device=dev)
        if one_pass:
            rfac = torch.empty(rows, dtype=torch.float32, device=dev)
            if need_w and contiguous:  # h's rows scaled for dW; a gathered chunk is scaled in place
                hs_buf = torch.empty(rows, H, dtype=cdt, device=dev)
        row_fn = _row_fn(opts.backend)
        leftover = budget - rows * (V * elt + 2 * H * elt)
        split = _dh_split(rows, H, V, w, leftover) if need_h else 1
        bounds = _chunk_bounds(n_valid, rows, rows)
        for start, end in zip(bounds, bounds[1:]):
            r = idx[start:end]
            lg = buf[: end - start]
            if start == 0 and hc0 is not None:
                hc = hc0[: end - start]  # its logits are in buf already
            else:
                hc = h[start:end] if contiguous else h.index_select(0, r)
                torch.mm(hc, wt, out=lg)
            rf = None if rfac is None else rfac[: end - start]
            row_fn(
                lg, r, labels, bias, row_scale, loss_out, ent_out, top1_out,
                grad_scale=grad_scale, scale_t=scale_t, logit_scale=opts.logit_scale,
                softcap=opts.softcap, smoothing=opts.smoothing, write_grad=write_grad,
                rfac_out=rf,
            )
            if need_b:
                db += lg.sum(0, dtype=torch.float32)
            if need_w and rf is not None:
                hc = torch.mul(hc, rf[:, None], out=hc if hs_buf is None else hs_buf[: end - start])
            if need_w:
                dw = _add_dw(dw, lg, hc, acc_dtype)
            if need_h:
                direct = contiguous and split == 1  # the GEMM writes into dh itself
                part = torch.mm(lg, w, out=dh[start:end]) if direct else _mm_dh(lg, w, split)
                if rf is not None:
                    # a second rounding after the GEMM's: grad_h error 2.8e-3 vs 2.3e-3 (two passes) on the
                    # H200; an fp32 GEMM output avoided it but cost time and 15 MiB (docs/fused_ce_notes.md)
                    part.mul_(rf[:, None])
                if not contiguous:
                    dh.index_copy_(0, r, part)
                elif not direct:
                    dh[start:end] = part
    del buf, hc0, hs_buf
    if need_w and dw is None:
        dw = torch.zeros(V, H, dtype=acc_dtype, device=dev)
    return dh, dw, db, idx


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        denom: torch.Tensor | None,
        opts: _Opts,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = hidden.device
        # the range names this head's kernels in a torch.profiler trace (forward: its gradients too)
        with torch.autocast(device_type=dev.type, enabled=False), \
                torch.profiler.record_function("sft_plugins.fused_ce"):
            cdt = opts.compute_dtype
            h = hidden.to(cdt).contiguous()
            w = weight.to(cdt)
            N = h.shape[0]
            # The one host read: the number of valid rows sizes the chunk loop (ignored rows cost no
            # GEMM work). It is read after the first chunk's GEMM is queued (_ValidRows); everything
            # else stays on the device.
            valid_rows = _ValidRows(labels, opts.ignore_index)
            loss_rows = torch.zeros(N, dtype=torch.float32, device=dev)
            if opts.want_stats:
                ent = torch.zeros(N, dtype=torch.float32, device=dev)
                top1 = torch.zeros(N, dtype=torch.uint8, device=dev)
            else:
                ent = torch.empty(0, dtype=torch.float32, device=dev)
                top1 = torch.empty(0, dtype=torch.uint8, device=dev)
            deferred = opts.reduction == "none" and (opts.need_w or opts.need_b)
            eager = not deferred
            # d(logits) already carries the 1/denominator of "mean": backward then only multiplies
            # by grad_output, which a device-side check skips when it is 1 (plain loss.backward())
            grad_scale: float | None = 1.0
            scale_t = None
            if opts.reduction == "mean":
                if denom is None:
                    grad_scale = None  # 1 / the number of valid rows, once the loop knows it
                else:
                    scale_t = 1.0 / torch.where(denom == 0, torch.ones_like(denom), denom)
            dh, dw, db, idx = _chunk_loop(
                h, w, bias, labels, valid_rows, opts, weight.dtype,
                need_h=eager and opts.need_h, need_w=eager and opts.need_w,
                need_b=eager and opts.need_b, row_scale=None, grad_scale=grad_scale,
                scale_t=scale_t, loss_out=loss_rows,
                ent_out=ent if opts.want_stats else None,
                top1_out=top1 if opts.want_stats else None,
            )
            inv: float | torch.Tensor = 1.0
            if opts.reduction == "mean":
                inv = 1.0 / max(idx.numel(), 1) if scale_t is None else scale_t
            if opts.reduction == "none":
                out = loss_rows
            elif opts.reduction == "sum":
                out = loss_rows.sum()
            else:
                out = loss_rows.sum() * inv
        ctx.opts = opts
        ctx.deferred = deferred
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.dh, ctx.dw, ctx.db = dh, dw, db
        if deferred:
            ctx.save_for_backward(h, w, bias, labels, idx)
        top1_bool = top1.view(torch.bool)
        ctx.mark_non_differentiable(ent, top1_bool)
        return out, ent, top1_bool

    @staticmethod
    def backward(ctx, g_out: torch.Tensor, _g_ent: torch.Tensor, _g_top1: torch.Tensor):  # type: ignore[override]
        opts: _Opts = ctx.opts
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        dev = g_out.device
        with torch.autocast(device_type=dev.type, enabled=False), \
                torch.profiler.record_function("sft_plugins.fused_ce"):
            if ctx.deferred:
                h, w, bias, labels, idx = ctx.saved_tensors
                scratch = torch.empty(h.shape[0], dtype=torch.float32, device=dev)
                dh, dw, db, _ = _chunk_loop(
                    h, w, bias, labels, idx, opts, w_dtype,
                    need_h=opts.need_h, need_w=opts.need_w, need_b=opts.need_b,
                    row_scale=g_out.float().contiguous(), grad_scale=1.0, scale_t=None,
                    loss_out=scratch,
                    ent_out=None, top1_out=None,
                )
                if dw is not None:
                    dw = dw.to(w_dtype)
            else:
                if getattr(ctx, "consumed", False):
                    raise RuntimeError(
                        "fused_linear_cross_entropy: its gradients are computed in the forward and "
                        "handed over once; a second backward through the same graph "
                        "(retain_graph=True) is not supported"
                    )
                ctx.consumed = True
                dh, dw, db = ctx.dh, ctx.dw, ctx.db
                ctx.dh = ctx.dw = ctx.db = None  # let autograd take the buffers over
                if opts.reduction == "none":  # only hidden needs a grad here: per-row scale
                    if dh is not None:
                        dh.mul_(g_out.to(dh.dtype)[:, None])
                else:
                    g = g_out.detach().float()
                    _scale_(dh, g, opts.backend)
                    if dw is not None and dw.dtype != w_dtype:
                        dw = (dw * g).to(w_dtype)  # fp32 accumulator mode
                    else:
                        _scale_(dw, g, opts.backend)
                    _scale_(db, g, opts.backend)
            if dh is not None and dh.dtype != h_dtype:
                dh = dh.to(h_dtype)
            if db is not None and b_dtype is not None:
                db = db.to(b_dtype)
        return dh, dw, db, None, None, None


def _apply(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    softcap: float | None,
    logit_scale: float,
    label_smoothing: float,
    num_items_in_batch: int | float | torch.Tensor | None,
    want_stats: bool,
    backend: str | None,
    chunk_rows: int | None,
    dw_accum: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must be [V, {H}], got {tuple(weight.shape)}")
    h2 = hidden.reshape(-1, H)
    y = labels.reshape(-1)
    if y.shape[0] != h2.shape[0]:
        raise ValueError(f"{h2.shape[0]} hidden rows but {y.shape[0]} labels")
    if y.device != h2.device:
        y = y.to(h2.device)
    dev = h2.device
    grad = torch.is_grad_enabled()
    if torch.is_autocast_enabled(dev.type):
        cdt = torch.get_autocast_dtype(dev.type)
    else:
        cdt = torch.promote_types(hidden.dtype, weight.dtype)
    mode = dw_accum or ce_setting("DW_ACCUM")
    if mode not in ("auto", "fp32", "native"):
        raise ValueError(f"dw_accum must be 'auto', 'fp32' or 'native', got {mode!r}")
    opts = _Opts(
        ignore_index=int(ignore_index),
        reduction=reduction,
        softcap=float(softcap) if softcap else None,
        logit_scale=float(logit_scale),
        smoothing=float(label_smoothing),
        backend=_pick_backend(dev, backend),
        compute_dtype=cdt,
        chunk_rows=chunk_rows,
        dw_accum=mode,
        want_stats=want_stats,
        need_h=grad and hidden.requires_grad,
        need_w=grad and weight.requires_grad,
        need_b=grad and bias is not None and bias.requires_grad,
    )
    denom = None
    if reduction == "mean" and num_items_in_batch is not None:
        # HF semantics: sum / num_items_in_batch; a tensor may live on another device (no sync)
        denom = torch.as_tensor(num_items_in_batch).to(dev, torch.float32, non_blocking=True)
    loss, ent, top1 = _FusedLinearCE.apply(h2, weight, bias, y, denom, opts)
    if reduction == "none":
        loss = loss.view(labels.shape)
    return loss, ent, top1
