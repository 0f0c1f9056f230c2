"""Tiled MLP for the layer recompute (``smart_checkpointing`` option ``mlp_chunks``): a token-wise MLP run
in sequence chunks, each recomputed in backward, so its intermediate activations exist one chunk at a time.

Imported only from inside the plugin's hooks: it imports torch at module level.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch

from .checkpoint import autocast_state


class _TiledMLP(torch.autograd.Function):
    """A token-wise MLP run in sequence chunks, each recomputed in backward: only its input is kept.

    Used inside the layer recompute (``mlp_chunks``): the MLP's intermediate activations, the largest
    part of a layer's (4 x intermediate_size per token), then exist for one chunk at a time.
    """

    @staticmethod
    def forward(ctx: Any, fn: Callable[[torch.Tensor], torch.Tensor], chunks: int, x: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.chunks, ctx.params = fn, chunks, params
        ctx.autocast = autocast_state(x)  # backward runs after the recompute's autocast has exited
        ctx.autocast_cache = torch.is_autocast_cache_enabled()
        ctx.save_for_backward(x)
        return torch.cat([fn(part) for part in x.chunk(chunks, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[2]
        params = [p for p, need in zip(ctx.params, ctx.needs_input_grad[3:]) if need]
        x_grad = torch.empty_like(x) if need_x else None
        sums: list[Any] = [None] * len(params)
        for part, g_part, out_part in zip(x.chunk(ctx.chunks, dim=-2), grad.chunk(ctx.chunks, dim=-2),
                                          x_grad.chunk(ctx.chunks, dim=-2) if need_x else [None] * ctx.chunks):
            part = part.detach().requires_grad_(need_x)
            with ExitStack() as stack:
                for device_type, enabled, dtype in ctx.autocast:
                    stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled,
                                                       cache_enabled=ctx.autocast_cache))
                with torch.enable_grad():
                    y = ctx.fn(part)
            grads = torch.autograd.grad(y, ([part] if need_x else []) + params, g_part, allow_unused=True)
            if need_x:
                out_part.copy_(grads[0])
                grads = grads[1:]
            sums = [g if s is None else (s if g is None else s + g) for s, g in zip(sums, grads)]
        it = iter(sums)
        return (None, None, x_grad, *[next(it) if need else None for need in ctx.needs_input_grad[3:]])


# An untiled MLP's recompute + backward holds about this many [tokens, intermediate] tensors at its peak:
# gate, up, act(gate) and their product saved, then the product's, act's and up's gradients.
_MLP_WORKING_SET = 7
_MAX_AUTO_CHUNKS = 32


def auto_mlp_chunks(need_bytes: int, headroom_bytes: int) -> int:
    """How many chunks ``mlp_chunks="auto"`` uses: none (1) while the MLP's working set takes at most half
    the memory still allowed, else enough that one chunk's share stays within a quarter of it."""
    if need_bytes <= headroom_bytes // 2:
        return 1
    if headroom_bytes <= 0:
        return _MAX_AUTO_CHUNKS
    return min(_MAX_AUTO_CHUNKS, max(2, -(-4 * need_bytes // headroom_bytes)))


def cuda_headroom(device: torch.device, enough: int | None = None) -> int:
    """Bytes this process may still allocate on ``device``: the device's free memory plus the cache, and
    within ``torch.cuda.set_per_process_memory_fraction``'s cap when one is set. No device sync.
    With ``enough``, the driver's free memory is returned as soon as it alone is ``enough`` (uncapped):
    the allocator's statistics cost ~350 us of host time a call (H200; docs/benchmarks.md, fused_ce)."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _d: 1.0)(device)
    if enough is not None and fraction >= 1.0 and free >= enough:
        return int(free)
    allocated = torch.cuda.memory_allocated(device)
    return int(min(free + torch.cuda.memory_reserved(device) - allocated, total * fraction - allocated))


def _mlp_width(mlp: torch.nn.Module) -> int:
    width = getattr(mlp, "intermediate_size", None)
    if isinstance(width, int):
        return width
    return max((m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)), default=0)


def make_tiled_forward(mlp: torch.nn.Module, chunks: int | str) -> Callable[..., Any]:
    """An instance ``forward`` for a token-wise MLP that runs it through :class:`_TiledMLP` when a graph
    is being built (the recompute), and as is otherwise. ``chunks="auto"`` tiles only a CUDA recompute
    whose MLP working set would not fit comfortably in the memory still allowed (so it costs nothing
    while memory is plentiful, and buys the longest contexts when it is not)."""
    inner = mlp.__dict__.get("forward") or functools.partial(type(mlp).forward, mlp)
    width = _mlp_width(mlp)

    def tiled_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or not torch.is_grad_enabled() or x.dim() < 2:
            return inner(x, *args, **kwargs)
        n = chunks
        if n == "auto":
            if not x.is_cuda or not width:
                return inner(x)
            elem = 2 if torch.is_autocast_enabled("cuda") else x.element_size()
            need = x[..., 0].numel() * width * elem * _MLP_WORKING_SET
            n = auto_mlp_chunks(need, cuda_headroom(x.device, enough=2 * need))
        params = [p for p in mlp.parameters() if p.requires_grad]
        if n < 2 or x.shape[-2] < 2 * n or not (x.requires_grad or params):
            return inner(x)
        return _TiledMLP.apply(inner, n, x, *params)

    return tiled_forward
