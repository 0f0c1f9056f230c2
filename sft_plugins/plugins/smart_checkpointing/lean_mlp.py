"""A memory-lean SwiGLU MLP for the layer recompute (``smart_checkpointing`` option ``lean_mlp``).

``down(silu(gate(x)) * up(x))`` with each projection a plain ``nn.Linear``, a frozen bitsandbytes 4-bit
``Linear4bit`` (QLoRA: dequantised per use with bitsandbytes' own kernel, as its ``matmul_4bit`` does for
training-sized inputs), or a PEFT LoRA ``Linear`` around either (vanilla LoRA: no DoRA or other variant, no
dropout, no LoRA bias). 8-bit ``Linear8bitLt`` projections are not fused (see ``plugins.shared.quant``).
Eager autograd keeps four [tokens, intermediate] tensors for the backward (gate, up, silu(gate), their
product) and allocates three more in it (the gradients of the product, of silu(gate), of up), plus PEFT's
``base + B(A(x))·s`` temporaries in the forward. Here the forward keeps only gate and up (LoRA sums
accumulated into the base output in place), and the backward allocates one: d(product); the SwiGLU backward
then overwrites gate and up with their gradients and d(product) with the product itself, which the down
projection's weight gradients need once more. The product and its gradient exist one row chunk at a time (a
quarter of the tokens on long inputs). Peak: 2¼ such tensors instead of ~8, the same products and sums
(results equal to eager up to rounding order; chunked weight gradients are summed in fp32).

Used where a graph is built (the recompute) and in the layer's first forward, which runs without one (the
same products as the recompute, none of PEFT's temporaries); anything else (evaluation, generation) falls
back to the module's own forward.

In a layer's recompute the MLP's output is only the root its gradient is fed into when the layer returns
``residual + mlp(...)`` (the backward of a sum does not read its operands): there the down projection's base
GEMM, a third of the MLP's forward work, is skipped and the output is zeros, while the product and its LoRA
``A`` products the weight gradients need are still made (``output_unused_in_recompute``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.nn.modules import module as torch_module

from ...kernels import swiglu_backward_, swiglu_forward
from ..shared.lora import (
    Projection,
    base_weight,
    compute_dtype,
    linear,
    linear_backward,
    lora_dy_b,
    lora_inputs,
    manual_region,
    projection,
)


def _is_silu(act: Any) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _plan(mlp: Any) -> tuple[tuple[Projection, Projection, Projection], list[torch.Tensor]] | None:
    if not _is_silu(getattr(mlp, "act_fn", None)):
        return None
    tensors: list[torch.Tensor] = []
    projs = [projection(getattr(mlp, name, None), tensors) for name in ("gate_proj", "up_proj", "down_proj")]
    if any(p is None for p in projs):
        return None
    return (projs[0], projs[1], projs[2]), tensors  # type: ignore[return-value]


# The SwiGLU product and its gradient are made in this many row chunks once there are enough rows that each
# chunk still fills the GPU's matmuls.
_H_CHUNKS = 4
_MIN_CHUNK_ROWS = 1024


def _row_chunks(n: int) -> list[slice]:
    if n < _H_CHUNKS * _MIN_CHUNK_ROWS:
        return [slice(0, n)]
    step = -(-n // _H_CHUNKS)
    return [slice(a, min(a + step, n)) for a in range(0, n, step)]


class _LeanSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, projs: tuple[Projection, Projection, Projection], skip_output: bool,
                *ts: torch.Tensor) -> torch.Tensor:
        cd = compute_dtype(x)
        gate, up, down = projs
        with manual_region(x.device.type, "sft_plugins.lean_mlp"):
            x2 = x.reshape(-1, x.shape[-1]).to(cd)
            e, xa_g = linear(x2, gate, ts, cd)
            g, xa_u = linear(x2, up, ts, cd)
            # nobody reads a skipped output: only what the backward needs is made (a SwiGLU MLP keeps x's width)
            w_down = None if skip_output else base_weight(down, ts, cd)
            y = (x2.new_zeros(x2.shape, dtype=cd) if w_down is None
                 else x2.new_empty((x2.shape[0], w_down.shape[0]), dtype=cd))
            xa_parts: list[list[torch.Tensor]] = []
            for rows in _row_chunks(x2.shape[0]):
                h = swiglu_forward(e[rows], g[rows])
                xa_parts.append(lora_inputs(h, down, ts, cd) if w_down is None
                                else linear(h, down, ts, cd, out=y[rows], weight=w_down)[1])
                del h
            del w_down
            xa_d = [torch.cat(parts) for parts in zip(*xa_parts)]
        ctx.projs, ctx.cd, ctx.x_dtype, ctx.x_shape = projs, cd, x.dtype, x.shape
        ctx.n_lora = (len(xa_g), len(xa_u), len(xa_d))
        ctx.save_for_backward(x2, e, g, *xa_g, *xa_u, *xa_d, *ts)
        ctx.done = False
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        if ctx.done:  # gate and up were overwritten by their gradients in the first backward
            raise RuntimeError("lean_mlp: backward through the same recompute twice (retain_graph) is not "
                               "supported; set smart_checkpointing option lean_mlp=False")
        ctx.done = True
        x2, e, g, *rest = ctx.saved_tensors
        ng, nu, nd = ctx.n_lora
        xa_g, xa_u, xa_d, ts = rest[:ng], rest[ng:ng + nu], rest[ng + nu:ng + nu + nd], rest[ng + nu + nd:]
        gate, up, down = ctx.projs
        cd = ctx.cd
        need = list(ctx.needs_input_grad[3:])
        grads: list[Any] = [None] * len(ts)
        with manual_region(dy.device.type, "sft_plugins.lean_mlp"):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(cd)
            dybs = lora_dy_b(dy2, down, ts, cd)
            need_h = (down.weight is not None and need[down.weight]) or any(need[ia] for ia, _, _ in down.loras)
            w_down = base_weight(down, ts, cd)
            for rows in _row_chunks(dy2.shape[0]):
                # d(product); the down projection's gradients that need the product come after it is rewritten
                dh = dy2[rows] @ w_down
                for (ia, _, s), dyb in zip(down.loras, dybs):
                    dh.addmm_(dyb[rows], ts[ia].to(cd), alpha=s)
                swiglu_backward_(e[rows], g[rows], dh, write_h=need_h)  # e <- d gate, g <- d up, dh <- product
                linear_backward(dy2[rows], dh if need_h else None, [xa[rows] for xa in xa_d], down, ts, need,
                                 grads, cd, want_dx=False, dybs=[dyb[rows] for dyb in dybs])
                del dh
            del w_down
            want_dx = ctx.needs_input_grad[0]
            dx = linear_backward(e, x2, xa_g, gate, ts, need, grads, cd, want_dx)
            linear_backward(g, x2, xa_u, up, ts, need, grads, cd, want_dx, dx_into=dx)  # adds into dx
            if dx is not None:
                dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        grads = [None if grad is None else grad.to(t.dtype) for grad, t in zip(grads, ts)]
        return (dx, None, None, *grads)


class LeanForward:
    """The ``forward`` installed on one SwiGLU MLP: the lean function when a graph is being built, or in its
    checkpointed layer's first forward (no graph: the recompute builds it), and the projections are fusable
    at call time (adapters can change); the module's own forward otherwise (evaluation, generation).
    ``output_unused`` and ``first_forward`` are this MLP's own flags, set only around its layer's recompute
    and first forward by :func:`output_unused` and :func:`during_first_forward`."""

    def __init__(self, mlp: torch.nn.Module, inner: Callable[..., Any]) -> None:
        self.mlp, self.inner, self.output_unused, self.first_forward = mlp, inner, False, False

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        graph = torch.is_grad_enabled()
        if args or kwargs or not (graph or self.first_forward) or x.dim() < 2 or x.shape[-1] == 0:
            return self.inner(x, *args, **kwargs)
        plan = _plan(self.mlp)
        if plan is None:
            return self.inner(x)
        projs, ts = plan
        if graph and not (x.requires_grad or any(t.requires_grad for t in ts)):
            return self.inner(x)
        # without a graph, the function runs its forward only: PEFT's temporaries (base + B(A(x))·s, silu(gate),
        # the product) are not made, and the output has the products the recompute will make
        skip_output = graph and self.output_unused and not _has_forward_hooks(self.mlp)
        return _LeanSwiGLU.apply(x, projs, skip_output, *ts)


def make_lean_forward(mlp: torch.nn.Module) -> LeanForward | None:
    """The lean ``forward`` for ``mlp``; None when the module is not a SwiGLU MLP at all."""
    if _plan(mlp) is None:
        return None
    return LeanForward(mlp, mlp.__dict__.get("forward") or functools.partial(type(mlp).forward, mlp))


# the end of transformers' Llama-style decoder layer forward (Llama, Mistral, Qwen2/3 and their copies)
_RESIDUAL_RETURN = re.compile(r"hidden_states=self\.mlp\(hidden_states\)hidden_states=residual\+hidden_states"
                              r"returnhidden_states$")


def _has_forward_hooks(module: torch.nn.Module) -> bool:
    """A forward hook would see the output (zeros when skipped); global hooks count too."""
    return bool(module._forward_hooks or torch_module._global_forward_hooks)


@functools.lru_cache(maxsize=None)
def _returns_residual_plus_mlp(layer_type: type) -> bool:
    try:
        source = inspect.getsource(layer_type.forward)
    except (OSError, TypeError):
        return False
    code = "".join(line.split("#")[0].strip() for line in source.splitlines()).replace(" ", "")
    return _RESIDUAL_RETURN.search(code) is not None


def output_unused_in_recompute(layer: torch.nn.Module) -> bool:
    """Whether the layer's recompute may skip its MLP's output: its forward ends ``hidden_states =
    self.mlp(hidden_states); hidden_states = residual + hidden_states; return hidden_states`` (checked on the
    source) and no forward hook would read the layer's output."""
    return _returns_residual_plus_mlp(type(layer)) and not _has_forward_hooks(layer)


@contextlib.contextmanager
def _flag(lean: LeanForward | None, name: str, value: bool) -> Iterator[None]:
    if lean is None:
        yield
        return
    before = getattr(lean, name)
    setattr(lean, name, value)
    try:
        yield
    finally:
        setattr(lean, name, before)


def output_unused(lean: LeanForward | None, active: bool) -> contextlib.AbstractContextManager[None]:
    """Around a layer's recompute: whether its lean MLP may skip its output (``output_unused_in_recompute``)."""
    return _flag(lean, "output_unused", active)


def during_first_forward(lean: LeanForward | None) -> contextlib.AbstractContextManager[None]:
    """Around a checkpointed layer's first forward (run without a graph): its lean MLP makes the output."""
    return _flag(lean, "first_forward", True)
