"""Model and device facts that both padding-free row plugins (``padding_free``, ``packing``) rely on."""

from __future__ import annotations

from typing import Any, Callable

FLASH_IMPLS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
# padding_free registers its packed attention under names with this prefix (one per backend)
PACKED_IMPL_PREFIX = "sft_packed"


def wants_cuda(args: Any) -> bool:
    """Whether the trainer will train on a CUDA device (``use_cpu`` honoured)."""
    import torch

    return torch.cuda.is_available() and not getattr(args, "use_cpu", False)


def packed_model_errors(model: Any) -> list[str]:
    """Reasons why one row holding several sequences would be wrong for this model: it must be a causal
    decoder whose attention separates sequences from ``position_ids`` (transformers' packed-sequence rule)."""
    if model is None:
        return []
    errors = []
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_causal", True) is False:
        errors.append("only decoder-only causal LMs are supported (packed rows rely on causal attention "
                      "within each sequence): use padding without this plugin for this model")
    impl = getattr(config, "_attn_implementation", None)
    known = impl in ("sdpa", "eager", "flex_attention", *FLASH_IMPLS) or str(impl).startswith(PACKED_IMPL_PREFIX)
    if not known:
        errors.append(f"attention implementation {impl!r} is not known to separate packed sequences: load the "
                      "model with attn_implementation='sdpa' (or 'eager', 'flash_attention_2')")
    return errors


def neftune_errors(args: Any, plugin: str) -> list[str]:
    """NEFTune scales its noise by 1/sqrt(row length x hidden size); on a row holding many sequences that
    is the whole row's length, so every sequence gets less noise than it would alone. Refused rather than
    silently changed."""
    if getattr(args, "neftune_noise_alpha", None) is None:
        return []
    return [f"neftune_noise_alpha scales the noise by the length of the whole row, and {plugin} puts several "
            "sequences in one row, so each would get less noise than in the baseline: unset "
            f"neftune_noise_alpha, or drop {plugin}"]


def patch_use_cache(model: Any) -> Callable[[], None] | None:
    """``use_cache=False`` on the model config: with a cache, transformers skips packed-sequence
    detection and the second sequence of a row attends to the first. TRL's compute_loss passes
    use_cache=False itself; plain ``Trainer`` does not. Returns the undo."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "use_cache"):
        return None
    previous = config.use_cache
    config.use_cache = False

    def undo() -> None:
        config.use_cache = previous

    return undo
