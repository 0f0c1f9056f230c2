"""A linear projection with LoRA, as the plugins that compute one themselves see it (``smart_checkpointing``'s
lean MLP, ``fused_lora``): a plain ``nn.Linear``, a frozen bitsandbytes 4-bit ``Linear4bit`` (dequantised per
use with bitsandbytes' own kernel), or a PEFT LoRA ``Linear`` around either (vanilla LoRA: no DoRA or other
variant, no dropout, no LoRA bias). Its tensors go into one list handed to an autograd function; the
forward adds the LoRA terms into the base output in place, the backward fills fp32 gradients.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from .profile import profile_range
from .quant import dequantized_weight, quantization_of


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the products are made in: autocast's when it is on for ``x``'s device, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


@contextmanager
def manual_region(device_type: str, name: str) -> Iterator[None]:
    """Autocast off (the products are cast to :func:`compute_dtype` by hand) and a ``torch.profiler`` range
    ``name`` naming the region's kernels in a profile."""
    off = torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()
    with off, profile_range(name):
        yield


@dataclass
class Projection:
    """One projection as indices into the tensor list handed to the autograd function; a 4-bit base
    layer is held as the module itself (its packed weight is no tensor autograd could use)."""

    weight: int | None
    bias: int | None = None
    quantized: Any = None
    loras: list[tuple[int, int, float]] = field(default_factory=list)  # (A index, B index, scaling)


def dropout_off(dropout: Any) -> bool:
    """A PEFT ``lora_dropout`` entry that never drops: ``Identity``, or ``Dropout`` with ``p == 0``."""
    return isinstance(dropout, torch.nn.Identity) or (isinstance(dropout, torch.nn.Dropout) and dropout.p == 0)


def projection(module: Any, tensors: list[torch.Tensor]) -> Projection | None:
    """Appends the projection's tensors to ``tensors``; None when it is not one we can fuse exactly."""
    quantization = quantization_of(module)
    if type(module) is torch.nn.Linear or quantization == "4bit":
        if quantization == "4bit":
            if module.weight.requires_grad:
                return None
            proj = Projection(None, quantized=module)
        else:
            proj = Projection(len(tensors))
            tensors.append(module.weight)
        if module.bias is not None:
            proj.bias = len(tensors)
            tensors.append(module.bias)
        return proj
    base = getattr(module, "base_layer", None)
    if base is None or not all(hasattr(module, a) for a in ("lora_A", "lora_B", "lora_dropout", "scaling")):
        return None
    proj = projection(base, tensors)
    if proj is None or getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return proj  # adapters off, or merged into the base weight: the base layer is the whole forward
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        a, b, drop = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
        if (name in getattr(module, "lora_variant", {}) or not dropout_off(drop) or type(a) is not torch.nn.Linear
                or type(b) is not torch.nn.Linear or a.bias is not None or b.bias is not None):
            return None
        proj.loras.append((len(tensors), len(tensors) + 1, float(module.scaling[name])))
        tensors.extend([a.weight, b.weight])
    return proj


def base_weight(proj: Projection, ts: Sequence[torch.Tensor], cd: torch.dtype) -> torch.Tensor:
    """The base weight in the compute dtype (a 4-bit one dequantised: one transient dense copy)."""
    if proj.quantized is not None:
        return dequantized_weight(proj.quantized, cd)
    return ts[proj.weight].to(cd)


def linear(inp: torch.Tensor, proj: Projection, ts: Sequence[torch.Tensor], cd: torch.dtype,
            out: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
    """``inp @ W.T (+ b) + sum_k s_k (inp @ A_k.T) @ B_k.T`` with the LoRA terms added in place (into
    ``out`` when given: a contiguous [rows, out_features] view); ``weight``: W in ``cd`` when already made."""
    bias = None if proj.bias is None else ts[proj.bias].to(cd)
    w = base_weight(proj, ts, cd) if weight is None else weight
    if out is None:
        out = torch.nn.functional.linear(inp, w, bias)
    elif bias is None:
        torch.mm(inp, w.t(), out=out)
    else:
        torch.addmm(bias, inp, w.t(), out=out)
    xas = lora_inputs(inp, proj, ts, cd)
    for (_, ib, s), xa in zip(proj.loras, xas):
        out.addmm_(xa, ts[ib].to(cd).t(), alpha=s)
    return out, xas


def lora_inputs(inp: torch.Tensor, proj: Projection, ts: Sequence[torch.Tensor],
                cd: torch.dtype) -> list[torch.Tensor]:
    """``inp @ A_k.T`` ([N, r]) per LoRA term: the B weights' gradients need them."""
    return [inp @ ts[ia].to(cd).t() for ia, _, _ in proj.loras]


def lora_dy_b(dy: torch.Tensor, proj: Projection, ts: Sequence[torch.Tensor], cd: torch.dtype) -> list[torch.Tensor]:
    """``dy @ B_k`` ([N, r]) per LoRA term: what both d(input) and dA need."""
    return [dy @ ts[ib].to(cd) for _, ib, _ in proj.loras]


def linear_backward(dy: torch.Tensor, inp: torch.Tensor | None, xas: Sequence[torch.Tensor], proj: Projection,
                     ts: Sequence[torch.Tensor], need: list[bool], grads: list[Any], cd: torch.dtype, want_dx: bool,
                     dybs: list[torch.Tensor] | None = None,
                     dx_into: torch.Tensor | None = None) -> torch.Tensor | None:
    """Fills ``grads`` for the projection's tensors in fp32 (adding to what is there: row chunks); returns
    d(input) when ``want_dx`` (added into ``dx_into`` when given). ``inp`` may be None when no gradient that
    needs it is wanted; ``dybs`` are the ``dy @ B_k`` products when already made."""

    def put(i: int, value: torch.Tensor) -> None:
        grads[i] = value.float() if grads[i] is None else grads[i].add_(value)

    if proj.weight is not None and need[proj.weight]:
        put(proj.weight, dy.t() @ inp)
    if proj.bias is not None and need[proj.bias]:
        put(proj.bias, dy.sum(0))
    if not want_dx:
        dx = None
    elif dx_into is None:
        dx = dy @ base_weight(proj, ts, cd)
    else:
        dx = dx_into.addmm_(dy, base_weight(proj, ts, cd))
    for (ia, ib, s), xa, dyb in zip(proj.loras, xas, dybs if dybs is not None else lora_dy_b(dy, proj, ts, cd)):
        if need[ib]:
            put(ib, (dy.t() @ xa).mul_(s))
        if need[ia]:
            put(ia, (dyb.t() @ inp).mul_(s))
        if dx is not None:
            dx.addmm_(dyb, ts[ia].to(cd), alpha=s)
    return dx
