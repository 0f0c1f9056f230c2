"""A memory-lean RMSNorm for the layer recompute (``smart_checkpointing`` option ``lean_norm``).

transformers' ``LlamaRMSNorm`` (and its copies: Mistral, Qwen2, Qwen3, ...) casts its input to fp32 and
autograd keeps that fp32 copy for the backward: in bf16, twice the input's size per norm, two norms per
layer. Here one fused function keeps only the input (alive anyway, or half the size) and one fp32 value per
row (``sft_plugins.kernels.rmsnorm_forward``). Forward values equal the module's own up to the order of the mean's sum.

Only modules whose ``forward`` is the very code of ``LlamaRMSNorm.forward`` are replaced (Gemma's ``1 + w``
norm and others keep their own), and only where a graph is being built (the recompute).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ...kernels import rmsnorm_backward, rmsnorm_forward


def _same_code(a: Any, b: Any) -> bool:
    a, b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return (a is not None and b is not None and a.co_code == b.co_code and a.co_names == b.co_names
            and a.co_consts == b.co_consts)


@functools.cache
def _llama_forward() -> Any:
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return LlamaRMSNorm.forward


def is_llama_rmsnorm(module: Any) -> bool:
    """The module computes ``w * (x * rsqrt(mean(x²) + eps)).to(x.dtype)`` with transformers' own code."""
    weight = getattr(module, "weight", None)
    reference = _llama_forward()
    return (reference is not None and isinstance(weight, torch.nn.Parameter) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float)
            and "forward" not in module.__dict__ and _same_code(type(module).forward, reference))


class _LeanRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        y, rstd = rmsnorm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward(dy, x, weight, rstd, want_dw=ctx.needs_input_grad[1])
        return (dx if ctx.needs_input_grad[0] else None, None if dw is None else dw.to(weight.dtype), None)


def lean_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The fused RMSNorm with autograd (exposed for tests)."""
    return _LeanRMSNorm.apply(x, weight, eps)


def make_lean_forward(norm: torch.nn.Module) -> Callable[..., Any] | None:
    """An instance ``forward`` running :func:`lean_rmsnorm` when a graph is being built (outside autocast,
    which ``LlamaRMSNorm`` does not change either), the module's own forward otherwise; None when the module
    is not a Llama-style RMSNorm."""
    if not is_llama_rmsnorm(norm):
        return None
    inner = functools.partial(type(norm).forward, norm)

    def lean_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if (args or kwargs or not torch.is_grad_enabled() or not x.is_floating_point()
                or not (x.requires_grad or norm.weight.requires_grad) or x.shape[-1] != norm.weight.shape[0]):
            return inner(x, *args, **kwargs)
        return lean_rmsnorm(x, norm.weight, norm.variance_epsilon)

    return lean_forward


def layer_norms(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """The Llama-style RMSNorms inside one decoder layer (input, post-attention, per-head q/k norms)."""
    return [m for m in layer.modules() if is_llama_rmsnorm(m)]
