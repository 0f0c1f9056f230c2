"""The profile summary of ``benchmarks/end_to_end.py``'s ``--profile`` arms: where the profiled steps' device
time went (CPU time off CUDA), by kernel, by coarse category, by the plugins' ``sft_plugins.*`` ranges, by
kind of work, and how much of a step the device was idle. Standard library only at top level (the Unsloth
child imports ``unsloth`` first).

Device time of an op is the duration of the kernels it launched. A kernel launched outside any aten op
(Triton's launcher) counts for the innermost host event around its launch: a ``sft_plugins.*`` range, or, as
H100 traces show for the SwiGLU kernels, the custom autograd Function's ``apply`` (``_LeanSwiGLU``) or
backward node (``_LeanSwiGLUBackward``); all are kind "plugin kernels (Triton)" when the range or the Function
is the plugins' own (``plugin_function_nodes``). Device-side spans of ranges (user annotations) are not
kernels and are left out, as torch's own tables do.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul",
            "aten::linear", "aten::_scaled_mm"}
COPY_OPS = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::cat",
            "aten::_copy_from", "aten::_copy_from_and_resize"}
ATTENTION_MARKS = ("flash", "attention", "sdpa", "varlen", "fmha", "efficient")
# what the issue-style table asks for, in print order
KINDS = ("base GEMMs", "LoRA adapter GEMMs", "casts and copies", "elementwise and other ops", "attention",
         "plugin kernels (Triton)", "4-bit dequantise", "offload copies", "CE head", "optimizer")


def profile_summary(prof: Any, spec: dict[str, Any], step_walls_s: list[float], step_s: float | None,
                    lora_rank: int | None) -> dict[str, Any]:
    """Top kernels/ops, coarse categories, ``ranges_ms``, ``kinds_ms`` (and their recompute part), and on CUDA
    the device's busy time per step against the unprofiled step time and where its idle time went."""
    events = prof.key_averages()

    def dev(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)

    cuda = spec["device"] == "cuda"
    key = (lambda e: dev(e)) if cuda else (lambda e: float(e.self_cpu_time_total))
    if cuda:  # kernels only: an aten op's self device time is its kernels' time again
        events = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")
                  and not getattr(e, "is_user_annotation", False)] or list(events)
    top = sorted(events, key=key, reverse=True)[:30]
    cats: dict[str, float] = {}
    for e in events:
        n = e.key.lower()
        cat = ("matmul" if any(s in n for s in ("gemm", "cutlass", "xmma", "nvjet", "matmul", "addmm", "::mm", "bmm"))
               else
               "attention" if any(s in n for s in ("flash", "fmha", "attention", "varlen", "sdpa")) else
               "triton" if "triton" in n else "memcpy" if "memcpy" in n or "memset" in n else
               "optimizer" if "adam" in n or "optim" in n else "other")
        cats[cat] = cats.get(cat, 0.0) + key(e)
    total = sum(cats.values()) or 1.0
    ranges, kinds, recompute = attribute(prof, cuda, lora_rank)
    out = {"steps": spec.get("profile_steps"), "time_kind": "self device time" if cuda else "self CPU time",
           "total_ms": round(total / 1e3, 2),
           "categories_ms": {k: round(v / 1e3, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
           "ranges_ms": ranges,
           "kinds_ms": kinds, "recompute_kinds_ms": recompute,
           **(device_busy(prof, step_walls_s, step_s) if cuda else {}),
           **(idle_attribution(prof, len(step_walls_s)) if cuda and step_walls_s else {}),
           "top": [{"name": e.key[:120], "ms": round(key(e) / 1e3, 3), "calls": e.count} for e in top]}
    pdir = spec.get("profile_dir")
    if pdir:
        Path(pdir).mkdir(parents=True, exist_ok=True)
        for sort in (("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)):
            try:
                text = prof.key_averages().table(sort_by=sort, row_limit=60)
            except Exception:  # the key's name differs between torch releases
                continue
            (Path(pdir) / f"{spec['arm']}_profile.txt").write_text(text)
            out["table_file"] = str(Path(pdir) / f"{spec['arm']}_profile.txt")
            break
        if spec.get("profile_trace"):
            with contextlib.suppress(Exception):
                prof.export_chrome_trace(str(Path(pdir) / f"{spec['arm']}_trace.json"))
    return out


_NODE_PREFIX = "autograd::engine::evaluate_function: "


def plugin_function_nodes() -> frozenset[str]:
    """The host events of the plugins' own autograd Functions: ``apply`` (the class name; the SwiGLU forward's
    kernels belong to it) and the backward node (the name + "Backward"), for the Functions imported so far:
    after an arm has run, the ones it used."""
    import torch  # here, not at the top: the Unsloth child imports unsloth first

    found, todo = [], list(torch.autograd.Function.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    ours = [c.__name__ for c in found if c.__module__.startswith("sft_plugins.")]
    return frozenset(ours + [f"{name}Backward" for name in ours])


def kind_of(name: str, ancestors: list[str], input_shapes: Any, lora_rank: int | None,
            plugin_nodes: frozenset[str] = frozenset()) -> str:
    """What an op (or a range's own kernels) is, for the step's time table: whole plugin regions first (the
    optimizer step, the CE head, the offload copies), then by the op itself; a GEMM with a dimension equal to
    the LoRA rank is adapter work. Kernels a plugin range or a plugin Function's event (one of ``plugin_nodes``)
    launched itself are the plugins' Triton kernels."""
    if any(a.startswith("Optimizer.step") or a.startswith("Optimizer.zero_grad") for a in ancestors) \
            or name.startswith("Optimizer.step"):
        return "optimizer"
    scope = [name, *ancestors]
    if "sft_plugins.fused_ce" in scope:
        return "CE head"
    if "sft_plugins.offload" in scope:
        return "offload copies"
    if name.startswith("sft_plugins.") or name.removeprefix(_NODE_PREFIX) in plugin_nodes:
        return "plugin kernels (Triton)"  # launched outside any aten op: Triton's launcher
    if name in GEMM_OPS:
        dims = {d for shape in (input_shapes or []) if isinstance(shape, (list, tuple)) for d in shape}
        return "LoRA adapter GEMMs" if lora_rank and lora_rank in dims else "base GEMMs"
    low = name.lower()
    if any(m in low for m in ATTENTION_MARKS):
        return "attention"
    if name in COPY_OPS:
        return "casts and copies"
    if "dequantize" in low:
        return "4-bit dequantise"
    return "elementwise and other ops"


def attribute(prof: Any, cuda: bool, lora_rank: int | None) -> tuple[dict[str, float], ...]:
    """Milliseconds over the profiled steps, in one walk of the host events: by the innermost ``sft_plugins.*``
    range the plugins open (recompute, layer_backward, offload, fused_ce, fused_lora, lean_mlp; the rest
    "other"), by ``kind_of``, and by ``kind_of`` for the part spent in a layer's recompute (under an
    ``sft_plugins.recompute`` range, the lean MLP's recompute included)."""
    ranges: dict[str, float] = {}
    kinds: dict[str, float] = {}
    recompute: dict[str, float] = {}
    plugin_nodes = plugin_function_nodes()
    for event in prof.events():
        if str(event.device_type).endswith("CUDA"):  # kernels and device-side spans: counted via their op
            continue
        spent = float(sum(k.duration for k in getattr(event, "kernels", []))) if cuda else \
            float(event.self_cpu_time_total)
        if not spent:
            continue
        scope = [event.name]
        parent = event.cpu_parent
        while parent is not None:
            scope.append(parent.name)
            parent = parent.cpu_parent
        owner = next((n for n in scope if n.startswith("sft_plugins.")), "other")
        ranges[owner] = ranges.get(owner, 0.0) + spent
        kind = kind_of(event.name, scope[1:], getattr(event, "input_shapes", None), lora_rank, plugin_nodes)
        kinds[kind] = kinds.get(kind, 0.0) + spent
        if "sft_plugins.recompute" in scope:
            recompute[kind] = recompute.get(kind, 0.0) + spent
    by_time = {k: round(v / 1e3, 2) for k, v in sorted(ranges.items(), key=lambda kv: -kv[1])}
    return by_time, {k: round(kinds[k] / 1e3, 2) for k in KINDS if k in kinds}, \
        {k: round(recompute[k] / 1e3, 2) for k in KINDS if k in recompute}


def _busy_intervals(prof: Any) -> list[list[float]]:
    """The intervals in which at least one kernel or copy ran on the device: their spans on all streams,
    overlaps merged (overlapped copies count once); device-side spans of ranges left out."""
    merged: list[list[float]] = []
    for a, b in sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if str(e.device_type).endswith("CUDA") and not e.is_user_annotation):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def device_busy(prof: Any, step_walls_s: list[float], step_s: float | None = None) -> dict[str, Any]:
    """Per profiled step: the time at least one kernel or copy ran on the device (the union of their intervals
    over all streams, so overlapped copies count once); the profiled step's wall time; and the host gap, the
    unprofiled step time (``step_s``; the profiled one when not given, which the profiler itself slows) less
    the busy time."""
    if not step_walls_s:
        return {}
    busy = sum(b - a for a, b in _busy_intervals(prof))
    n = len(step_walls_s)
    wall_ms, busy_ms = 1e3 * sum(step_walls_s) / n, busy / 1e3 / n
    step_ms = 1e3 * step_s if step_s else wall_ms
    return {"profiled_step_wall_ms": round(wall_ms, 1), "step_ms": round(step_ms, 1),
            "device_busy_ms": round(busy_ms, 1), "host_gap_ms": round(max(0.0, step_ms - busy_ms), 1)}


def _innermost_at(host: list[Any], times: list[float]) -> list[Any]:
    """For each time (ascending), the innermost host event running then (the latest-started one), or None."""
    import heapq

    order = sorted(range(len(host)), key=lambda i: host[i].time_range.start)
    active: list[tuple[float, int]] = []
    found, k = [], 0
    for t in times:
        while k < len(order) and host[order[k]].time_range.start <= t:
            heapq.heappush(active, (host[order[k]].time_range.end, order[k]))
            k += 1
        while active and active[0][0] < t:
            heapq.heappop(active)
        found.append(host[max(active, key=lambda a: host[a[1]].time_range.start)[1]] if active else None)
    return found


def _scope(event: Any) -> str:
    while event is not None:
        if event.name.startswith(("sft_plugins.", "Optimizer.")):
            return event.name
        event = event.cpu_parent
    return "other"


def idle_attribution(prof: Any, n_steps: int, min_gap_us: float = 5.0) -> dict[str, Any]:
    """Where the device waited for the host, over the profiled steps (so the profiler's own host overhead is in
    them), in ms per step: each gap with no kernel or copy on any stream, longer than ``min_gap_us``, is charged
    to the plugin range or optimizer step around the host op running when it ended, the one launching the next
    work (``idle_ms_by_scope``), and to the host op running when it began (``idle_ms_by_op_at_start``: a sync
    such as ``aten::item`` there is what drained the queue; "(no op)": Python between ops)."""
    busy = _busy_intervals(prof)
    gaps = [(prev[1], nxt[0]) for prev, nxt in zip(busy, busy[1:]) if nxt[0] - prev[1] > min_gap_us]
    if not gaps:
        return {}
    host = [e for e in prof.events() if not str(e.device_type).endswith("CUDA")]
    by_scope: dict[str, float] = {}
    by_op: dict[str, float] = {}
    ends, starts = _innermost_at(host, [b for _, b in gaps]), _innermost_at(host, [a for a, _ in gaps])
    for (a, b), ended, began in zip(gaps, ends, starts):  # the gaps, and so their ends and starts, ascend
        scope = _scope(ended)
        by_scope[scope] = by_scope.get(scope, 0.0) + (b - a)
        op = began.name if began is not None else "(no op)"
        by_op[op] = by_op.get(op, 0.0) + (b - a)

    def top(d: dict[str, float], n: int) -> dict[str, float]:
        return {k: round(v / 1e3 / n_steps, 2) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]}

    return {"idle_gaps_per_step": round(len(gaps) / n_steps, 1), "idle_ms_by_scope": top(by_scope, 10),
            "idle_ms_by_op_at_start": top(by_op, 10)}
