"""The fused LoRA projection: ``x @ W.T (+ b) + s (x @ A.T) @ B.T`` as one autograd function.

PEFT's ``lora.Linear.forward`` runs the base layer, then per adapter casts the input to the adapter's dtype
(fp32 adapters under bf16 autocast, peft's default: a full [tokens, in] fp32 copy, which autocast casts back
to bf16 for the matmul), runs ``lora_A``, ``lora_B``, scales and adds: four activation-sized elementwise
passes per projection and a bf16 copy of the input saved for ``lora_A``'s backward, seven projections a
layer, in the forward, the recompute and the backward. Here the input is used as it comes (in the autocast
dtype), the LoRA product is added into the base output in place by one ``addmm`` (scale included), and the
backward saves only the input (shared by q/k/v, gate/up) and the [tokens, r] products. Same products and
sums as PEFT; under autocast the scale-and-add rounds once instead of three times (bf16 noise), in fp32
equal up to rounding order.

A frozen 4-bit base (QLoRA) is dequantised per use with bitsandbytes' own kernel (``plugins.shared.lora``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..shared.lora import Projection, compute_dtype, linear, linear_backward, manual_region, projection


def _project(x: torch.Tensor, proj: Projection, ts: Sequence[torch.Tensor]) -> tuple[Any, ...]:
    """``(output, input as [rows, in] in the compute dtype, the LoRA [rows, r] products, compute dtype)``."""
    cd = compute_dtype(x)
    with manual_region(x.device.type, "sft_plugins.fused_lora"):
        x2 = x.reshape(-1, x.shape[-1]).to(cd)
        y, xas = linear(x2, proj, ts, cd)
    return y.view(*x.shape[:-1], y.shape[-1]), x2, xas, cd


class _FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, proj: Projection, *ts: torch.Tensor) -> torch.Tensor:
        y, x2, xas, cd = _project(x, proj, ts)
        ctx.proj, ctx.cd, ctx.x_dtype, ctx.x_shape, ctx.n_lora = proj, cd, x.dtype, x.shape, len(xas)
        ctx.save_for_backward(x2, *xas, *ts)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x2, *rest = ctx.saved_tensors
        xas, ts = rest[:ctx.n_lora], rest[ctx.n_lora:]
        need = list(ctx.needs_input_grad[2:])
        grads: list[Any] = [None] * len(ts)
        with manual_region(dy.device.type, "sft_plugins.fused_lora"):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(ctx.cd)
            dx = linear_backward(dy2, x2, xas, ctx.proj, ts, need, grads, ctx.cd, ctx.needs_input_grad[0])
        if dx is not None:
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        return (dx, None, *[None if g is None else g.to(t.dtype) for g, t in zip(grads, ts)])


def fused_lora_linear(x: torch.Tensor, proj: Projection, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The projection's output; with autograd when a gradient is wanted, else the plain fused forward."""
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors)):
        return _FusedLoraLinear.apply(x, proj, *tensors)
    return _project(x, proj, tensors)[0]


def is_lora_linear(module: Any) -> bool:
    """A PEFT LoRA linear layer (``peft.tuners.lora`` ``Linear`` or a bitsandbytes variant of it)."""
    kind = type(module)
    return kind.__module__.startswith("peft.tuners.lora") and hasattr(module, "base_layer") and \
        all(hasattr(module, a) for a in ("lora_A", "lora_B", "lora_dropout", "scaling"))


def make_fused_forward(module: torch.nn.Module) -> Callable[..., Any]:
    """An instance ``forward`` for a PEFT LoRA linear layer: the fused function whenever the layer is
    fusable at call time (adapters can be switched, merged, given dropout), PEFT's own forward otherwise."""
    inner = functools.partial(type(module).forward, module)

    def fused_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or x.dim() < 2 or not x.is_floating_point():
            return inner(x, *args, **kwargs)
        tensors: list[torch.Tensor] = []
        proj = projection(module, tensors)
        if proj is None or not proj.loras:
            return inner(x)
        return fused_lora_linear(x, proj, tensors)

    fused_forward.__sft_plugins_fused_lora__ = True  # type: ignore[attr-defined]
    return fused_forward
