"""packing: best-fit-decreasing packing of tokenized examples into rows of ``max_length`` tokens.

Hooks: ``sft_describe``, ``sft_check``, ``sft_update_args`` (TRL's own packing/padding-free off and
its dataset preparation skipped, since the packed dataset is ready), ``sft_patch_model``
(``use_cache=False``), ``sft_prepare_dataset`` (tokenize like SFTTrainer when needed, build labels,
split or truncate over-long examples, pack), ``sft_data_collator`` (the boundary-keeping padding-free
collator, only when ``padding_free`` is not composed: then padding_free's collator, the same class,
is used, with its fast attention), ``sft_callbacks`` (repack each epoch).

Options: :data:`OPTIONS` (``sft-plugins info packing`` prints them).

Loss normalisation: every sequence keeps its own labels (first label of each sequence masked by the
collator), and the trainer divides by ``num_items_in_batch`` counted from the labels, so each token
weighs what it weighs unpacked. Examples that have no trainable token after truncation are dropped, as
SFTTrainer does, and counted in :attr:`PackedRows.stats` (also logged).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any, Callable

from ..._markers import hookimpl
from ..._options import Option
from ..shared import make_packed_collator, neftune_errors, packed_model_errors, patch_use_cache, wants_cuda
from .rows import row_length, user_loss_args

OPTIONS = [
    Option("max_length", None, "tokens per packed row (None: args.max_length)", type=int, minimum=2, nullable=True),
    Option("overlong", "truncate", "examples longer than a row: 'truncate' (as SFTTrainer, args.truncation_mode) "
           "or 'split' into row-sized pieces; counted and reported either way", choices=("truncate", "split")),
    Option("repack_each_epoch", False, "a new packing (seed + epoch) every epoch, same row count", type=bool),
    Option("seed", None, "packing order seed (None: args.seed)", type=int, nullable=True),
    Option("completion_only_loss", None, "train on completions only when a completion_mask is present "
           "(None: as TRL, args.completion_only_loss)", type=bool, nullable=True),
]


@hookimpl
def sft_options() -> list[Option]:
    return OPTIONS


@hookimpl
def sft_describe(options: dict[str, Any]) -> dict[str, Any]:
    return {"summary": "best-fit-decreasing packing into rows of max_length (>= 99.5% fill), sequence "
                       "boundaries kept, over-long examples split or truncated and reported",
            "loss_parity": None,
            "quantized": "unchanged: it changes only the data"}


@hookimpl
def sft_check(names: list[str], args: Any, model: Any, options: dict[str, Any]) -> list[str]:
    errors = neftune_errors(args, "packing")
    ml = row_length(args, options)
    if ml is None or ml < 2:
        errors.append("packing needs a row length: set SFTConfig(max_length=...) or "
                      "compose(options={'packing': {'max_length': 2048}})")
    if args is not None and getattr(args, "dataset_kwargs", None) and "skip_prepare_dataset" in args.dataset_kwargs \
            and not args.dataset_kwargs["skip_prepare_dataset"]:
        errors.append("dataset_kwargs={'skip_prepare_dataset': False} conflicts with packing, which prepares the "
                      "dataset itself: drop that key")
    return errors + packed_model_errors(model)


@hookimpl
def sft_update_args(args: Any, state: SimpleNamespace) -> dict[str, Any] | None:
    # The dataset we return is tokenized, labelled and packed: TRL must neither prepare it again nor
    # pack it (its BFD would also switch on its padding-free mode, which refuses our collator).
    if args is None:  # nothing to override; the trainer will get its defaults
        return None
    # The user's loss masks are applied while packing (into the labels); the trainer's copy of the args
    # must not ask for them again: SFTTrainer checks assistant_only_loss against the dataset's first
    # example, which is a packed row, not a conversation.
    state.loss_args = user_loss_args(args)
    overrides: dict[str, Any] = {"remove_unused_columns": False}
    if getattr(args, "assistant_only_loss", False):
        overrides["assistant_only_loss"] = False
    if hasattr(args, "packing"):
        overrides["packing"] = False
    if hasattr(args, "padding_free"):
        overrides["padding_free"] = False
    if hasattr(args, "dataset_kwargs"):
        overrides["dataset_kwargs"] = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    return overrides


@hookimpl
def sft_patch_model(model: Any, args: Any, names: list[str]) -> Callable[[], None] | None:
    if "padding_free" not in names and wants_cuda(args):
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl in ("sdpa", "eager"):
            warnings.warn(f"packing without padding_free: {impl} builds a dense T x T block-diagonal mask for every "
                          "packed row on the GPU (correct, but O(T^2)); compose(['packing', 'padding_free']) for "
                          "varlen attention", stacklevel=2)
    return patch_use_cache(model)


@hookimpl
def sft_prepare_dataset(dataset: Any, processing_class: Any, args: Any, options: dict[str, Any], split: str,
                        state: SimpleNamespace, formatting_func: Any) -> Any:
    from .rows import pack_dataset

    hf, rows = pack_dataset(dataset, processing_class, args, options, formatting_func=formatting_func,
                            loss_args=getattr(state, "loss_args", None))
    if split == "train":
        state.train_rows = rows  # for the repack callback of this stack's run
    return hf


@hookimpl
def sft_data_collator(processing_class: Any, args: Any, options: dict[str, Any], names: list[str]) -> Any:
    if "padding_free" in names:
        return None  # padding_free supplies the same collator, plus fast attention
    return make_packed_collator(processing_class, args, completion_only_loss=options["completion_only_loss"])


@hookimpl
def sft_callbacks(options: dict[str, Any], state: SimpleNamespace) -> list[Any] | None:
    rows = getattr(state, "train_rows", None)
    if not options["repack_each_epoch"] or rows is None:
        return None
    from .callbacks import RepackEachEpoch

    return [RepackEachEpoch(rows)]
