"""The per-layer checkpoint function of ``smart_checkpointing``: an autograd Function that keeps only the
layer's input (through :class:`~.offload.Offloader`, on the host between forward and backward) and
recomputes the layer in backward with the forward's RNG and autocast state.

Imported only from inside the plugin's hooks: it imports torch at module level.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..shared import is_dtensor, is_fsdp_module, profile_range
from .budget import saved_bytes_counter
from .lean_mlp import during_first_forward, output_unused, output_unused_in_recompute
from .offload import Offloader


@dataclass
class LayerPlan:
    offloader: Offloader
    slot: int  # index among the checkpointed layers
    keep: bool  # input stays on the GPU (the last k layers; more under a memory_budget)
    layer: Any = None  # the module (its parameters are not activations when the budget measures)
    checkpoint: bool = True  # False (memory_budget): the layer runs as is, keeping all its activations
    calibrate: Any = None  # a budget.Measurement to fill from this layer's next recompute, then None
    lean_mlp: Any = None  # the layer's MLP's lean_mlp.LeanForward, if installed


def _device_types(x: torch.Tensor) -> list[str]:
    return ["cpu"] if x.device.type == "cpu" else ["cpu", x.device.type]


def autocast_state(x: torch.Tensor) -> list[tuple[str, bool, torch.dtype]]:
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _device_types(x)]


class _OffloadedCheckpoint(torch.autograd.Function):
    """Runs ``run(x)`` without a graph; in backward, gets ``x`` back and recomputes with one.

    The layer's trainable parameters are inputs of this function, so their gradients are returned
    through autograd like any other (no reentrant ``.grad`` writes) and LoRA needs no input grads.
    With ``accumulate`` (FSDP2: the parameters the recompute uses are the unsharded ones FSDP swaps in
    during it, not the sharded ones seen when the layer is called) the recompute's backward instead
    accumulates into the ``.grad`` of whatever leaves it used, as reentrant checkpointing does, and FSDP's
    own hooks reduce-scatter them; ``params`` is then one empty anchor that keeps the graph alive.
    """

    @staticmethod
    def forward(ctx: Any, run: Callable[[torch.Tensor], Any], plan: LayerPlan, accumulate: bool, x: torch.Tensor,
                *params: torch.Tensor) -> Any:
        ctx.set_materialize_grads(False)
        ctx.run, ctx.plan, ctx.params, ctx.accumulate = run, plan, params, accumulate
        ctx.autocast = autocast_state(x)
        ctx.autocast_cache = torch.is_autocast_cache_enabled()
        ctx.rng = None
        if plan.offloader.config.preserve_rng_state:  # dropout must draw the same masks in the recompute
            ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
        with profile_range("sft_plugins.offload"):  # names the copy in a profile
            ctx.token = plan.offloader.save(x, plan.slot, plan.keep)  # copy starts before the layer runs
        if ctx.token.entry.where == "device":
            ctx.save_for_backward(x)
        with during_first_forward(plan.lean_mlp):
            return run(x)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> tuple[Any, ...]:
        with profile_range("sft_plugins.offload"):
            loaded = ctx.plan.offloader.load(ctx.token)
        x = loaded if loaded is not None else ctx.saved_tensors[0]
        need_x = ctx.needs_input_grad[3]
        x = x.detach().requires_grad_(need_x)
        with ExitStack() as stack:
            if ctx.rng is not None:
                devices = [x.device] if x.is_cuda else []
                stack.enter_context(torch.random.fork_rng(devices=devices))
                torch.set_rng_state(ctx.rng[0])
                if ctx.rng[1] is not None:
                    torch.cuda.set_rng_state(ctx.rng[1], x.device)
            for device_type, enabled, dtype in ctx.autocast:  # backward runs outside the trainer's autocast
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled,
                                                   cache_enabled=ctx.autocast_cache))
            measurement, ctx.plan.calibrate = ctx.plan.calibrate, None
            if measurement is not None:  # memory_budget: what one layer saves when it keeps its activations
                hooks, seen = saved_bytes_counter(list(ctx.plan.layer.parameters()) if ctx.plan.layer else [])
                stack.enter_context(hooks)
            lean = ctx.plan.lean_mlp
            skip = lean is not None and output_unused_in_recompute(ctx.plan.layer)
            with torch.enable_grad(), profile_range("sft_plugins.recompute"), output_unused(lean, skip):
                out = ctx.run(x)
            if measurement is not None:
                tokens = max(1, x[..., 0].numel())
                measurement.tokens = tokens
                measurement.input_per_token = x.element_size() * x.shape[-1]
                measurement.saved_per_token = sum(seen.values()) / tokens
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if ctx.accumulate:
            if pairs:
                with profile_range("sft_plugins.layer_backward"):
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            ctx.run = ctx.params = None
            return (None, None, None, x.grad if need_x else None, *[None] * len(ctx.needs_input_grad[4:]))
        wanted = ([x] if need_x else []) + [p for p, need in zip(ctx.params, ctx.needs_input_grad[4:]) if need]
        grads: Iterable[Any] = [None] * len(wanted)
        if pairs and wanted:
            with profile_range("sft_plugins.layer_backward"):
                grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                            allow_unused=True)
        it = iter(grads)
        x_grad = next(it) if need_x else None
        param_grads = [next(it) if need else None for need in ctx.needs_input_grad[4:]]
        ctx.run = ctx.params = None  # drop the closure (masks, position embeddings) early
        return (None, None, None, x_grad, *param_grads)


def _requires_grad_anywhere(values: Iterable[Any], depth: int = 2) -> bool:
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.requires_grad:
                return True
        elif depth and isinstance(v, (tuple, list)):
            if _requires_grad_anywhere(v, depth - 1):
                return True
        elif depth and isinstance(v, dict):
            if _requires_grad_anywhere(v.values(), depth - 1):
                return True
    return False


def make_checkpoint_fn(layer: torch.nn.Module, plan: LayerPlan) -> Callable[..., Any]:
    """The ``_gradient_checkpointing_func`` for one layer.

    transformers calls it as ``fn(partial(forward, layer, **kwargs), *args)`` with the hidden states
    first. Inputs it cannot offload exactly (a graph-carrying tensor besides the hidden states, which
    would need its own gradient) get torch's non-reentrant checkpoint instead, still exact.
    """

    def smart_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # older transformers call us under no_grad too: no backward to serve
            return function(*args, **kwargs)
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and plan.slot == 0:
            counters = plan.offloader.counters
            counters["max_tokens"] = max(counters.get("max_tokens", 0), x[..., 0].numel())
        if not plan.checkpoint:  # memory_budget left this layer whole: no recompute, all activations kept
            plan.offloader.counters["unchecked_calls"] += 1
            return function(*args, **kwargs)
        keywords = function.keywords.values() if isinstance(function, functools.partial) else ()
        if (not isinstance(x, torch.Tensor) or not x.is_floating_point()
                or _requires_grad_anywhere((*args[1:], *kwargs.values(), *keywords))):
            plan.offloader.counters["plain_calls"] += 1
            return torch_checkpoint(function, *args, use_reentrant=False,
                                    preserve_rng_state=plan.offloader.config.preserve_rng_state, **kwargs)
        params = [p for p in layer.parameters() if p.requires_grad]  # per call: PEFT may add adapters later
        if not x.requires_grad and not params:
            return function(*args, **kwargs)  # nothing to differentiate: no checkpoint needed
        rest = args[1:]

        def run(h: torch.Tensor) -> Any:
            return function(h, *rest, **kwargs)

        # an FSDP2 unit, or parameters sharded by an enclosing one: the recompute will use others
        if is_fsdp_module(layer) or any(is_dtensor(p) for p in params):
            plan.offloader.counters["fsdp_calls"] += 1
            anchor = torch.empty(0, device=x.device, requires_grad=True)
            return _OffloadedCheckpoint.apply(run, plan, True, x, anchor)
        return _OffloadedCheckpoint.apply(run, plan, False, x, *params)

    smart_checkpoint.__qualname__ = f"smart_checkpoint[{plan.slot}]"
    return smart_checkpoint
