"""fused_ce option ``downcast_frozen_embeddings``: give back the memory of frozen fp32 embeddings.

peft's ``prepare_model_for_kbit_training`` (the QLoRA recipe of peft's docs, and scripts built on it) casts
every non-quantised weight of a 4-/8-bit model to fp32: the input embedding and the LM head, which LoRA
training leaves frozen, then take twice their bf16 bytes (1 GiB instead of 0.5 for a 128k x 2048 tied
table; 4 GiB instead of 2 for Llama-3-8B's two tables). Their values came from bf16, so storing them in
the training's half dtype again loses nothing:

* the LM head is read only by the fused kernel in training, which multiplies in the autocast dtype
  whatever the weight's storage dtype (and autocast casts it for evaluation likewise);
* the input embedding's lookup is cast back to the dtype the weight had, so the residual stream and every
  number after it are bit-identical.

Done at ``on_train_begin``, once PEFT has frozen what it freezes and only where the weight is frozen, fp32,
the trainer runs bf16/fp16 mixed precision, and every value is exact in that dtype. Undone by the stack's
``undo()`` (cast back to fp32: exact, since the values came from fp32 exactly).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def _half_dtype(args: Any) -> Any:
    import torch

    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return None


def _exact_in(weight: Any, dtype: Any) -> bool:
    import torch

    with torch.no_grad():
        return bool(torch.equal(weight.to(dtype).float(), weight))


def downcast(model: Any, args: Any, state: SimpleNamespace) -> int:
    """Store the model's frozen, half-exact fp32 input/output embedding weights in the half dtype; returns
    the bytes given back. What was changed is recorded in ``state.downcast`` for :func:`restore`."""
    import torch

    half = _half_dtype(args)
    if half is None or getattr(state, "downcast", None):
        return 0
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    done: list[Any] = []  # the weights cast (a tied table once)
    for module in (embed, head):
        weight = getattr(module, "weight", None)
        if (not isinstance(weight, torch.nn.Parameter) or weight.dtype != torch.float32 or weight.requires_grad
                or any(weight is w for w in done) or not _exact_in(weight, half)):
            continue
        weight.data = weight.data.to(half)
        done.append(weight)
    hooks = []
    if embed is not None and any(weight is getattr(embed, "weight", None) for weight in done):
        # the lookup comes back in fp32 as before: the residual stream keeps its dtype and its values
        hooks.append(embed.register_forward_hook(lambda _module, _args, out: out.float()))
    saved = sum(w.numel() * 2 for w in done)  # 4 bytes a value before, 2 now
    state.downcast = SimpleNamespace(weights=done, hooks=hooks, saved_bytes=saved)
    return saved


def restore(state: SimpleNamespace) -> None:
    """Undo :func:`downcast`: fp32 weights again (exactly the values they had), hooks removed."""
    import torch

    record = getattr(state, "downcast", None)
    if record is None:
        return
    for hook in record.hooks:
        hook.remove()
    for weight in record.weights:
        weight.data = weight.data.to(torch.float32)
    state.downcast = None


def make_callback(state: SimpleNamespace) -> Any:
    from transformers import TrainerCallback

    class FrozenEmbeddingDowncast(TrainerCallback):
        """At train begin (PEFT has frozen the base by then): frozen fp32 embeddings back to the half dtype."""

        def on_train_begin(self, args: Any, control_state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if model is not None:
                from .lm_head import base_of

                saved = downcast(base_of(model), args, state)
                if saved:
                    import logging

                    logging.getLogger("sft_plugins").info(
                        "fused_ce: frozen fp32 embeddings stored in %s again (%.2f GiB given back; values "
                        "unchanged)", _half_dtype(args), saved / 2**30)

    return FrozenEmbeddingDowncast()
