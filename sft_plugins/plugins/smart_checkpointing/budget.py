"""``smart_checkpointing`` option ``memory_budget``: spend the GPU memory the user allows on not recomputing.

Every checkpointed layer has three modes, from the least memory to the least time:

* ``offload``: checkpointed, its input on the host between forward and backward (the tightest setting,
  and the default ``memory_budget: "tight"``);
* ``device``: checkpointed, its input kept on the GPU (no copies; ``keep_last_on_gpu`` does this for the
  last k layers);
* ``none``: not checkpointed; the layer keeps every activation its backward needs and is not recomputed.

The first training step runs the tightest plan and measures what the plan needs, on the device itself:
- the memory before the step (weights, gradients, optimizer state) and the step's peak;
- the layer's input bytes per token;
- the bytes autograd saves when one layer runs with a graph, per token. These are counted in that
  layer's recompute with ``saved_tensors_hooks``; parameters and their casts are not counted.

At the end of that step the planner scales the step's transient memory to the largest step the
arguments allow: ``per_device_train_batch_size x max_length``, or the largest step seen so far when
``max_length`` is None. It then turns the last layers to ``none`` (their activations are freed first in
backward) and the next ones to ``device``, as many as fit under the budget with a 10% margin. The rest
stay offloaded. The same math runs in every mode, so the losses do not change (parity tests).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("sft_plugins")
MARGIN = 0.10  # of the budget, for fragmentation and what the first step did not show
GiB = 2**30


def parse_budget(value: Any, total_bytes: int) -> int | None:
    """Bytes the process may hold on the device, or None for the tightest plan. ``"auto"``: what the device
    allows this process; a number ≤ 1: that fraction of it; a larger number: GiB."""
    if value in (None, "tight"):
        return None
    if value == "auto":
        return total_bytes
    value = float(value)
    return int(value * total_bytes) if value <= 1 else int(value * GiB)


@dataclass
class Measurement:
    """What the first (tightest) step showed: bytes and tokens."""

    base: int = 0  # allocated before the step
    peak: int = 0  # the step's peak
    tokens: int = 0  # tokens per step (the first checkpointed layer's input)
    input_per_token: float = 0.0  # a layer's input
    saved_per_token: float = 0.0  # what autograd saves for one layer run with a graph
    on_device: int = 0  # layers whose input stayed on the device in that step (keep_last_on_gpu)


def plan_modes(n_layers: int, budget: int, m: Measurement, max_tokens: int) -> tuple[int, int]:
    """``(n_none, n_device)``: how many of the last layers to leave un-checkpointed, and how many before them
    to checkpoint with the input kept on the device, so that the predicted peak stays under the budget."""
    scale = max_tokens / max(1, m.tokens)
    transient = max(0, m.peak - m.base - m.on_device * m.input_per_token * m.tokens) * scale
    free = budget * (1 - MARGIN) - m.base - transient
    full = m.saved_per_token * max_tokens  # a layer that keeps its activations
    inp = m.input_per_token * max_tokens  # a checkpointed layer whose input stays on the device
    if free <= 0 or full <= 0 or inp <= 0:
        return 0, 0
    n_none = min(n_layers, int(free // full))
    free -= n_none * full
    n_device = min(n_layers - n_none, int(free // inp))
    return n_none, n_device


def saved_bytes_counter(params: list[Any]) -> tuple[Any, dict[int, int]]:
    """``saved_tensors_hooks`` pack/unpack pair that records the storages autograd saves (each once, by its
    data pointer), leaving out the layer's parameters and tensors that alias them."""
    import torch

    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and t.device.type != "meta":
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in skip and not isinstance(t, torch.nn.Parameter):
                seen[ptr] = storage.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), seen


@dataclass(eq=False)
class BudgetState:
    """The plan of one patch: the budget option, what was measured, and what was decided."""

    option: Any  # "auto", a fraction, GiB (parse_budget)
    budget: int = 0  # bytes, once planned
    measurement: Measurement = field(default_factory=Measurement)
    calibrated: bool = False
    planned_tokens: int = 0
    modes: dict[str, int] = field(default_factory=dict)


def device_memory() -> tuple[int, int, int]:
    """``(allocated, peak, allowed)`` bytes on the current CUDA device (allowed: its total memory within
    ``set_per_process_memory_fraction``)."""
    import torch

    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _d: 1.0)(device)
    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device), int(total * fraction)


def measurable() -> bool:
    """The planner needs the CUDA caching allocator's figures."""
    import torch

    return torch.cuda.is_available()


def reset_peak() -> None:
    import torch

    torch.cuda.reset_peak_memory_stats()


def apply_modes(plans: list[Any], n_none: int, n_device: int, keep_last: int) -> dict[str, int]:
    """Set each layer's mode: the last ``n_none`` not checkpointed, the next ``n_device`` (at least the
    ``keep_last_on_gpu`` ones) with their input on the device, the rest offloaded."""
    n = len(plans)
    n_device = max(n_device, min(keep_last, n) - n_none)
    for i, plan in enumerate(plans):
        from_end = n - i
        plan.checkpoint = from_end > n_none
        plan.keep = plan.checkpoint and from_end <= n_none + n_device
    return {"none": n_none, "device": max(0, min(n_device, n - n_none)), "offload": max(0, n - n_none - n_device)}


def make_planner(patch: Any, args: Any, keep_last: int) -> Any:
    """The callback that measures the first step and sets the layers' modes."""
    from transformers import TrainerCallback

    state: BudgetState = patch.budget
    plans = patch.plans

    def max_tokens(seen: int) -> int:
        length = getattr(args, "max_length", None)
        batch = getattr(args, "per_device_train_batch_size", None)
        return max(seen, int(length) * int(batch)) if length and batch else seen

    def plan(tokens: int) -> None:
        budget = state.budget = parse_budget(state.option, device_memory()[2]) or 0
        n_none, n_device = plan_modes(len(plans), budget, state.measurement, tokens)
        state.modes = apply_modes(plans, n_none, n_device, keep_last)
        state.planned_tokens = tokens
        m = state.measurement
        logger.info("smart_checkpointing: memory_budget %.1f GiB for steps up to %d tokens: %s (measured: %.2f GiB "
                    "before a step, %.2f GiB peak at %d tokens, %.0f / %.0f bytes per token saved by a layer / its "
                    "input)", budget / GiB, tokens, state.modes, m.base / GiB, m.peak / GiB, m.tokens,
                    m.saved_per_token, m.input_per_token)

    class MemoryBudgetPlanner(TrainerCallback):
        def on_train_begin(self, args: Any, trainer_state: Any, control: Any, **kw: Any) -> None:
            if not measurable():
                logger.warning("smart_checkpointing: memory_budget=%r needs a CUDA device to measure; every "
                               "layer stays checkpointed", state.option)
                state.calibrated = True  # nothing to plan

        def on_step_begin(self, args: Any, trainer_state: Any, control: Any, **kw: Any) -> None:
            if not state.calibrated and plans:
                state.measurement.base = device_memory()[0]
                state.measurement.on_device = sum(p.keep for p in plans)
                reset_peak()
                plans[0].calibrate = state.measurement

        def on_step_end(self, args: Any, trainer_state: Any, control: Any, **kw: Any) -> None:
            m = state.measurement
            if not state.calibrated:
                if not m.tokens:  # no recompute ran (e.g. nothing trainable reached the layers)
                    return
                m.peak = device_memory()[1]
                state.calibrated = True
                plan(max_tokens(m.tokens))
            elif state.planned_tokens and (seen := patch.offloader.counters["max_tokens"]) > state.planned_tokens:
                plan(max_tokens(seen))  # a longer step than planned for: plan again

    return MemoryBudgetPlanner()
