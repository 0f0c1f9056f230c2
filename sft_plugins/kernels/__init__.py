"""The project's kernels, and the only way into them: the fused linear + cross-entropy head (Triton on
CUDA, Triton interpreter or torch on CPU), the 8-bit blockwise AdamW step, one tensor or many in one launch
(adamw_8bit on CUDA), and the SwiGLU and RMSNorm forward/backward of smart_checkpointing's lean recompute.

Imports only torch (and, lazily, triton); no transformers. Environment settings: ``_backend.CE_SETTINGS``.
"""

from __future__ import annotations

import torch

from ._function import CEStats, _apply

__all__ = [
    "Adam8bitUpdate",
    "CEStats",
    "adam8bit_blockwise_step_",
    "adam8bit_blockwise_step_grouped_",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_stats",
    "rmsnorm_backward",
    "rmsnorm_forward",
    "swiglu_backward_",
    "swiglu_forward",
]

# Loaded on first use (module __getattr__, PEP 562): the cross-entropy path does not import them.
_LAZY = {
    "Adam8bitUpdate": "._triton_adam8bit",
    "adam8bit_blockwise_step_grouped_": "._triton_adam8bit",
    "rmsnorm_forward": "._rmsnorm",
    "rmsnorm_backward": "._rmsnorm",
    "swiglu_forward": "._swiglu",
    "swiglu_backward_": "._swiglu",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def adam8bit_blockwise_step_(*args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """One AdamW step on bitsandbytes-format 8-bit blockwise state, in place (Triton).

    See :func:`sft_plugins.kernels._triton_adam8bit.adam8bit_blockwise_step_` for the arguments; imported
    lazily so that the cross-entropy path does not pay for compiling it.
    """
    from ._triton_adam8bit import adam8bit_blockwise_step_ as step

    step(*args, **kwargs)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    logit_scale: float = 1.0,
    label_smoothing: float = 0.0,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    _backend: str | None = None,
    _chunk_rows: int | None = None,
    _dw_accum: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` without the N x V logits.

    Args:
        hidden: ``[N, H]`` (any leading dims are flattened), the last hidden states.
        weight: ``[V, H]`` LM-head weight. If it does not require grad (LoRA), no dW work is done.
        labels: ``[N]`` (same leading dims as ``hidden``), already shifted; ``ignore_index`` rows
            contribute nothing and cost no matmul work.
        bias: optional ``[V]``.
        reduction: ``"mean"`` (sum over valid tokens / number of valid tokens, or /
            ``num_items_in_batch`` when given), ``"sum"``, or ``"none"`` (fp32 per-token loss with
            the shape of ``labels``, 0 at ignored positions).
        softcap: logits -> ``softcap * tanh(logits / softcap)`` (Gemma-2), applied after the scale.
        logit_scale: logits = ``(hidden @ weight.T + bias) * logit_scale``.
        label_smoothing: as ``torch.nn.functional.cross_entropy`` defines it.
        num_items_in_batch: Hugging Face gradient-accumulation normalisation for ``"mean"``: the
            loss is ``sum / num_items_in_batch``. An int, float or 0-dim tensor on any device.

    Returns the loss in fp32 (scalar, or per token for ``"none"``). If every label is ignored the
    loss is 0 and all gradients are 0. Private ``_backend`` ("triton" | "torch"), ``_chunk_rows``
    and ``_dw_accum`` ("auto" | "fp32" | "native") exist for tests and benchmarks; the environment
    variables of ``_backend.CE_SETTINGS`` (``SFT_PLUGINS_CE_BACKEND``, ``_DW_ACCUM``,
    ``_WORKSPACE_MB``, ...) set the same globally.
    """
    loss, _, _ = _apply(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction,
        softcap=softcap, logit_scale=logit_scale, label_smoothing=label_smoothing,
        num_items_in_batch=num_items_in_batch, want_stats=False, backend=_backend,
        chunk_rows=_chunk_rows, dw_accum=_dw_accum,
    )
    return loss


def fused_linear_cross_entropy_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "none",
    softcap: float | None = None,
    logit_scale: float = 1.0,
    label_smoothing: float = 0.0,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    _backend: str | None = None,
    _chunk_rows: int | None = None,
    _dw_accum: str | None = None,
) -> CEStats:
    """:func:`fused_linear_cross_entropy` plus the per-token statistics TRL's metrics need.

    Returns ``CEStats(loss, entropy, is_top1)``:

    * ``loss``: as :func:`fused_linear_cross_entropy` with the same ``reduction`` (default
      ``"none"``: fp32 per-token loss, shape of ``labels``, with grad; ``-loss`` is TRL's
      ``log_probs`` when ``label_smoothing == 0``).
    * ``entropy``: ``[N]`` fp32, detached: entropy of the softmax of the final (scaled, softcapped)
      logits; 0 at ignored rows.
    * ``is_top1``: ``[N]`` bool, detached: the label's logit is the row maximum (argmax == label;
      an exact tie counts as a hit); False at ignored rows.

    The statistics come from the same pass that computes the log-sum-exp (one extra fp32 running sum
    per row), so they cost next to nothing. Speed note: with a trainable ``weight`` (or bias),
    ``reduction="none"`` recomputes the logits in backward (the per-token upstream gradient enters
    the dW sum); with a frozen weight, or with ``"sum"``/``"mean"``, all gradients are produced
    in the forward pass. A caller that only needs a weighted sum should pass ``reduction="sum"``
    (and divide) rather than reduce a ``"none"`` result itself.
    """
    loss, ent, top1 = _apply(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction,
        softcap=softcap, logit_scale=logit_scale, label_smoothing=label_smoothing,
        num_items_in_batch=num_items_in_batch, want_stats=True, backend=_backend,
        chunk_rows=_chunk_rows, dw_accum=_dw_accum,
    )
    shape = labels.shape
    return CEStats(loss, ent.view(shape), top1.view(shape))
