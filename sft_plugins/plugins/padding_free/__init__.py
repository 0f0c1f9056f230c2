"""padding_free: train on one flattened, padding-free row per batch, with attention that stays inside
each sequence and, on the GPU, skips the cross-sequence blocks.

Hooks: ``sft_describe``, ``sft_check``, ``sft_update_args`` (TRL's own ``padding_free``/``packing``
off, ``remove_unused_columns=False``), ``sft_patch_model`` (``use_cache=False``; packed attention
backend), ``sft_data_collator`` (:class:`~sft_plugins.plugins.shared.PackedCollator`).

Options: :data:`OPTIONS` (``sft-plugins info padding_free``). ``attention="auto"`` keeps a model already
on flash_attention_2/3 (varlen kernels read our cu_seq_lens); otherwise on CUDA it uses PyTorch's varlen
flash kernel (``varlen``, falling back to ``flex`` when torch lacks it); on CPU it keeps sdpa/eager
(transformers builds the block-diagonal mask from ``position_ids``: exact, and dense only on CPU).
``dense`` keeps sdpa/eager on GPU too (with a warning: it costs O(T^2)); ``loop`` runs one sdpa per
sequence on any device.

Torch and transformers are imported inside the hooks only, so listing plugins stays cheap.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

from ..._errors import PluginError
from ..._markers import hookimpl
from ..._options import Option
from ..shared import (
    FLASH_IMPLS,
    make_packed_collator,
    neftune_errors,
    packed_model_errors,
    patch_use_cache,
    wants_cuda,
)

logger = logging.getLogger("sft_plugins.padding_free")

ATTENTION = ("auto", "varlen", "flex", "loop", "dense", "flash")
OPTIONS = [
    Option("attention", "auto", "attention over packed rows: auto | varlen | flex | loop | dense | flash "
           "(auto: flash if loaded so, else varlen/flex on CUDA, sdpa's block mask on CPU)", choices=ATTENTION),
    Option("pad_to_multiple_of", None, "pad each row with one masked dummy sequence to a multiple of this "
           "(None: args.pad_to_multiple_of)", type=int, minimum=1, nullable=True),
    Option("completion_only_loss", None, "train on completions only when a completion_mask is present "
           "(None: as TRL, args.completion_only_loss)", type=bool, nullable=True),
]


def resolve_attention(options: dict[str, Any], model: Any, args: Any) -> str:
    """The attention path that will run: one of ``flash``, ``varlen``, ``flex``, ``loop``, ``dense``."""
    from .attention import current_impl, varlen_available

    choice = options["attention"]
    impl = current_impl(model) or ""
    if choice != "auto":
        return choice
    if impl in FLASH_IMPLS:
        return "flash"
    if not wants_cuda(args):
        return "dense"
    return "varlen" if varlen_available() else "flex"


def attention_errors(model: Any, attention: str) -> list[str]:
    """Reasons why ``attention`` cannot serve this model's packed rows."""
    if model is None or attention not in ("varlen", "flex", "loop"):
        return []
    errors = []
    config = getattr(model, "config", None)
    if getattr(config, "attention_dropout", 0.0):
        errors.append(f"attention={attention!r} has no attention dropout: set config.attention_dropout=0 or "
                      "use attention='dense'")
    if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
        errors.append(f"{type(model).__name__} does not use transformers' AttentionInterface, so attention="
                      f"{attention!r} cannot be installed: use attention='dense'")
    return errors


@hookimpl
def sft_options() -> list[Option]:
    return OPTIONS


@hookimpl
def sft_describe(options: dict[str, Any]) -> dict[str, Any]:
    return {"summary": "one padding-free row per batch (position_ids restart, cu_seq_lens, no attention "
                       "mask), attention kept inside each sequence: varlen/FlexAttention on GPU",
            "loss_parity": 1e-3,
            "quantized": "unchanged: attention holds no quantised weights"}


@hookimpl
def sft_check(names: list[str], args: Any, model: Any, options: dict[str, Any]) -> list[str]:
    errors = neftune_errors(args, "padding_free")
    if getattr(args, "packing", False) and "packing" not in names:
        errors.append("SFTConfig(packing=True) makes TRL turn on its own padding-free mode, which refuses our "
                      "collator: set packing=False, or compose the 'packing' plugin "
                      "(compose(['packing', 'padding_free']))")
    if args is not None and getattr(args, "per_device_train_batch_size", 2) == 1 and "packing" not in names:
        logger.warning("padding_free with per_device_train_batch_size=1 removes no padding; raise the batch size")
    if model is not None:
        attention = resolve_attention(options, model, args)
        if attention in ("varlen", "flex") and not wants_cuda(args):
            errors.append(f"attention={attention!r} needs a CUDA GPU: use attention='auto' (sdpa with the "
                          "position_ids mask on CPU) or attention='loop'")
        if attention == "varlen":
            from .attention import varlen_available

            if not varlen_available():
                errors.append("attention='varlen' needs torch.nn.attention.varlen (torch >= 2.10): upgrade torch "
                              "or use attention='flex'")
        if attention == "flash" and model.config._attn_implementation not in FLASH_IMPLS:
            errors.append("attention='flash' needs the model loaded with attn_implementation='flash_attention_2' "
                          "(pip install flash-attn); or use attention='auto'")
        errors += packed_model_errors(model) + attention_errors(model, attention)
    return errors


@hookimpl
def sft_update_args(args: Any, options: dict[str, Any]) -> dict[str, Any] | None:
    # Our collator adds position_ids/cu_seq_lens, so TRL must not run its own padding-free mode (it
    # refuses custom collators); plain Trainer would drop completion_mask/assistant_masks/seq_lengths
    # columns that the model's forward does not name, so keep every column for the collator.
    if args is None:  # nothing to override; the trainer will get its defaults
        return None
    overrides: dict[str, Any] = {"remove_unused_columns": False}
    if hasattr(args, "padding_free"):
        overrides["padding_free"] = False
    return overrides


@hookimpl
def sft_patch_model(model: Any, args: Any, options: dict[str, Any]) -> Callable[[], None]:
    undos = []
    cache_undo = patch_use_cache(model)
    if cache_undo is not None:
        undos.append(cache_undo)
    attention = resolve_attention(options, model, args)
    if attention in ("varlen", "flex", "loop"):
        from .attention import install

        try:
            undos.append(install(model, attention))
        except Exception as exc:
            for u in reversed(undos):
                u()
            raise PluginError(f"padding_free could not install attention={attention!r}: {exc}; use "
                              "attention='dense'") from exc
    elif attention == "dense" and wants_cuda(args):
        warnings.warn("padding_free attention='dense': sdpa/eager builds a dense T x T block-diagonal mask for "
                      "packed rows on the GPU (correct, but O(T^2)); attention='auto' uses a varlen kernel",
                      stacklevel=2)
    logger.info("padding_free: attention path %s", attention)

    def undo() -> None:
        for u in reversed(undos):
            u()

    return undo


@hookimpl
def sft_data_collator(processing_class: Any, args: Any, options: dict[str, Any]) -> Any:
    return make_packed_collator(processing_class, args, completion_only_loss=options["completion_only_loss"],
                                pad_to_multiple_of=options["pad_to_multiple_of"])
