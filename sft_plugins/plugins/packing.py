"""packing: best-fit-decreasing packing of tokenized examples into rows of ``max_length`` tokens.

Hooks: ``sft_describe``, ``sft_check``, ``sft_update_args`` (TRL's own packing/padding-free off and
its dataset preparation skipped, since the packed dataset is ready), ``sft_patch_model``
(``use_cache=False``), ``sft_prepare_dataset`` (tokenize like SFTTrainer when needed, build labels,
split or truncate over-long examples, pack), ``sft_data_collator`` (the boundary-keeping padding-free
collator, only when ``padding_free`` is not composed: then padding_free's collator, the same class,
is used, with its fast attention), ``sft_callbacks`` (repack each epoch).

Options:
    max_length: int (default: ``args.max_length``) - tokens per packed row.
    overlong: "truncate" (default, like SFTTrainer: ``args.truncation_mode``) | "split" - what to do
        with examples longer than max_length; counted and reported either way.
    repack_each_epoch: bool (default False) - new BFD packing with seed ``seed + epoch`` every epoch.
    seed: int (default ``args.seed``).
    completion_only_loss: bool | None (default as TRL: use ``completion_mask`` when present).

Loss normalisation: every sequence keeps its own labels (first label of each sequence masked by the
collator), and the trainer divides by ``num_items_in_batch`` counted from the labels, so each token
weighs what it weighs unpacked. Examples that have no trainable token after truncation are dropped, as
SFTTrainer does, and counted in :attr:`PackedRows.stats` (also logged).
"""

from __future__ import annotations

import logging
import uuid
import warnings
from typing import Any, Callable

from .._markers import hookimpl

logger = logging.getLogger("sft_plugins.packing")

_OPTIONS = {"max_length", "overlong", "repack_each_epoch", "seed", "completion_only_loss"}


def _max_length(args: Any, options: dict[str, Any]) -> int | None:
    value = options.get("max_length", getattr(args, "max_length", None))
    return int(value) if value is not None else None


@hookimpl
def sft_describe(options: dict[str, Any]) -> dict[str, Any]:
    return {"summary": "best-fit-decreasing packing into rows of max_length (>= 99.5% fill), sequence "
                       "boundaries kept, over-long examples split or truncated and reported",
            "loss_parity": None}


@hookimpl
def sft_check(names: list[str], args: Any, model: Any, options: dict[str, Any]) -> list[str]:
    # The collator hook is not given the composed names; remember them here (sft_check runs first).
    options["_names"] = list(names)
    errors = []
    unknown = sorted(k for k in set(options) - _OPTIONS if not k.startswith("_"))
    if unknown:
        errors.append(f"unknown options {unknown}; packing takes {sorted(_OPTIONS)}")
    if options.get("overlong", "truncate") not in ("truncate", "split"):
        errors.append(f"overlong must be 'truncate' or 'split', got {options.get('overlong')!r}")
    ml = _max_length(args, options)
    if ml is None or ml < 2:
        errors.append("packing needs a row length: set SFTConfig(max_length=...) or "
                      "compose(options={'packing': {'max_length': 2048}})")
    if args is not None and getattr(args, "dataset_kwargs", None) and "skip_prepare_dataset" in args.dataset_kwargs \
            and not args.dataset_kwargs["skip_prepare_dataset"]:
        errors.append("dataset_kwargs={'skip_prepare_dataset': False} conflicts with packing, which prepares the "
                      "dataset itself: drop that key")
    if model is not None:
        from .padding_free import check_model

        errors += check_model(model, "dense")
    return errors


@hookimpl
def sft_update_args(args: Any, options: dict[str, Any]) -> dict[str, Any] | None:
    # The dataset we return is tokenized, labelled and packed: TRL must neither prepare it again nor
    # pack it (its BFD would also switch on its padding-free mode, which refuses our collator).
    if args is None:  # nothing to override; the trainer will get its defaults
        return None
    overrides: dict[str, Any] = {"remove_unused_columns": False}
    if hasattr(args, "packing"):
        overrides["packing"] = False
    if hasattr(args, "padding_free"):
        overrides["padding_free"] = False
    if hasattr(args, "dataset_kwargs"):
        overrides["dataset_kwargs"] = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    return overrides


@hookimpl
def sft_patch_model(model: Any, args: Any, options: dict[str, Any]) -> Callable[[], None] | None:
    from .padding_free import _wants_cuda, patch_use_cache

    if "padding_free" not in options.get("_names", []) and _wants_cuda(args):
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl in ("sdpa", "eager"):
            warnings.warn(f"packing without padding_free: {impl} builds a dense T x T block-diagonal mask for every "
                          "packed row on the GPU (correct, but O(T^2)); compose(['packing', 'padding_free']) for "
                          "varlen attention", stacklevel=2)
    return patch_use_cache(model)


# -- dataset ---------------------------------------------------------------------------------------
def _tokenize_like_sft_trainer(dataset: Any, processing_class: Any, args: Any) -> Any:
    """Run SFTTrainer's own dataset preparation (conversion, EOS, chat template, tokenization, labels)
    without truncation or packing, so packed rows hold exactly what SFTTrainer would have trained on."""
    import dataclasses
    from types import SimpleNamespace

    from trl import SFTTrainer
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    from .._errors import PluginError

    tok = getattr(processing_class, "tokenizer", processing_class)
    if tok is None:
        raise PluginError("packing must tokenize this dataset: pass processing_class=<tokenizer> to prepare()")
    sample = next(iter(dataset))
    completion_only = args.completion_only_loss
    if completion_only is None:
        completion_only = "prompt" in sample and "completion" in sample
    chat_template = None
    if args.assistant_only_loss and not has_generation_markers(tok.chat_template):
        chat_template = get_training_chat_template(tok)
    shim = SimpleNamespace(_tokenizer=tok, completion_only_loss=completion_only, chat_template=chat_template)
    raw_args = dataclasses.replace(args, max_length=None, packing=False, shuffle_dataset=False)
    return SFTTrainer._prepare_dataset(shim, dataset, processing_class, raw_args, False, None, "train")


def _columns(dataset: Any) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:
        names = list(dataset[0].keys())
    return list(names)


def _flat_columns(dataset: Any, completion_only_loss: bool | None) -> tuple[Any, Any, Any]:
    """``(tokens, labels, offsets)`` as flat numpy arrays of all examples (``labels is tokens`` when the
    dataset has no labels or masks: every token is a label)."""
    import numpy as np

    from ._collate import build_labels

    cols = _columns(dataset)
    try:
        import pyarrow as pa
        from datasets import Dataset

        fast = isinstance(dataset, Dataset) and ("labels" in cols or not {"completion_mask", "assistant_masks"} & set(cols))
    except ImportError:
        fast = False
    if fast:
        # Arrow columns straight to numpy (zero-copy where the layout allows): ~100x faster than rows
        table = dataset.select_columns(["input_ids"] + (["labels"] if "labels" in cols else [])).with_format("arrow")[:]
        if table.num_rows == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64)
        ids_col = pa.concat_arrays(table.column("input_ids").chunks)
        offsets = np.asarray(ids_col.offsets, dtype=np.int64)
        offsets = offsets - offsets[0]
        tokens = ids_col.flatten().to_numpy(zero_copy_only=False)
        if "labels" not in cols:
            return tokens, tokens, offsets  # labels are the input ids: the same array, no copy
        lab_col = pa.concat_arrays(table.column("labels").chunks)
        lab_off = np.asarray(lab_col.offsets, dtype=np.int64)
        if not np.array_equal(lab_off - lab_off[0], offsets):
            raise ValueError("an example's labels and input_ids differ in length")
        labels = lab_col.flatten().to_numpy(zero_copy_only=False)
        return tokens, labels, offsets
    ids_parts, lab_parts, lens = [], [], []
    for ex in dataset:
        ids = np.asarray(ex["input_ids"], dtype=np.int32)
        ids_parts.append(ids)
        lab_parts.append(build_labels(ex, completion_only_loss).astype(np.int32))
        lens.append(ids.size)
    offsets = np.concatenate(([0], np.cumsum(lens))).astype(np.int64)
    cat = (lambda p: np.concatenate(p) if p else np.zeros(0, np.int32))
    return cat(ids_parts), cat(lab_parts), offsets


def prepare_items(tokens: Any, labels: Any, offsets: Any, max_length: int, overlong: str,
                  truncation_mode: str = "keep_start") -> tuple[Any, Any, dict[str, int]]:
    """Item ``(starts, lengths)`` into the flat arrays after splitting or truncating over-long examples
    and dropping those with no trainable token left; plus the counts of what happened."""
    import numpy as np

    starts = offsets[:-1].astype(np.int64)
    lengths = np.diff(offsets).astype(np.int64)
    stats = {"examples": int(lengths.size), "overlong": int((lengths > max_length).sum()), "split_pieces": 0,
             "truncated_tokens": 0, "empty": int((lengths == 0).sum()), "no_loss_dropped": 0}
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    long = lengths > max_length
    if long.any():
        if overlong == "split":
            n_pieces = -(-lengths // max_length)
            rep_starts = np.repeat(starts, n_pieces)
            piece = np.arange(n_pieces.sum()) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
            rep_len = np.repeat(lengths, n_pieces)
            starts = rep_starts + piece * max_length
            lengths = np.minimum(max_length, rep_len - piece * max_length)
            stats["split_pieces"] = int(n_pieces[long].sum())
        else:
            stats["truncated_tokens"] = int((lengths[long] - max_length).sum())
            if truncation_mode == "keep_end":
                starts = np.where(long, starts + lengths - max_length, starts)
            lengths = np.minimum(lengths, max_length)
    # An item needs a trainable label after its first token (the first is never predicted).
    if labels is tokens:  # labels = input ids: every token but the first trains
        has_loss = lengths > 1
    else:
        csum = np.zeros(labels.size + 1, dtype=np.int64 if labels.size >= 2**31 else np.int32)
        np.cumsum(labels != -100, out=csum[1:])
        has_loss = (csum[starts + lengths] - csum[starts + 1]) > 0 if starts.size else np.zeros(0, bool)
    stats["no_loss_dropped"] = int((~has_loss).sum())
    return starts[has_loss], lengths[has_loss], stats


class PackedRows:
    """The packed rows: ``{"input_ids", "labels", "seq_lengths"}`` per row, computed on access.

    Tokens live in two flat int32 arrays; a row is a list of item slices. It is the transform of the
    ``datasets.Dataset`` that :func:`pack_dataset` returns (a column of row numbers), which keeps
    SFTTrainer's type check happy and lets ``set_epoch(e)`` repack in place with seed ``seed + e``
    when ``repack_each_epoch`` (keeping the row count, so the trainer's step count holds). ``stats``
    reports examples, over-long ones, split pieces, truncated tokens, drops, rows and fill.
    """

    def __init__(self, tokens: Any, labels: Any, starts: Any, lengths: Any, max_length: int, seed: int | None,
                 repack_each_epoch: bool, stats: dict[str, Any]):
        from ._bfd import pack

        self.tokens, self.labels, self.starts, self.lengths = tokens, labels, starts, lengths
        self.max_length, self.seed, self.repack_each_epoch = max_length, seed, repack_each_epoch
        self.packing = pack(lengths, max_length, seed=seed)
        self.epoch = 0
        self.token = uuid.uuid4().hex  # identifies this packing in datasets' fingerprints
        self.stats = {**stats, "items": int(lengths.size), "rows": self.packing.n_rows,
                      "tokens": self.packing.total_tokens, "fill": round(self.packing.fill, 6), "repacks": 0,
                      "repack_fallbacks": 0}

    def __len__(self) -> int:
        return self.packing.n_rows

    def row(self, i: int) -> dict[str, Any]:
        import numpy as np

        if not -len(self) <= i < len(self):
            raise IndexError(i)
        p = self.packing
        items = p.row_items[p.row_ptr[i]:p.row_ptr[i + 1]]
        sl = [slice(int(self.starts[j]), int(self.starts[j] + self.lengths[j])) for j in items]
        # numpy rows (not lists): the collator takes them without a Python round trip per token
        return {"input_ids": np.concatenate([self.tokens[s] for s in sl]).astype(np.int64),
                "labels": np.concatenate([self.labels[s] for s in sl]).astype(np.int64),
                "seq_lengths": [int(self.lengths[j]) for j in items]}

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """``datasets`` transform: a batch of row numbers -> the rows' columns."""
        rows = [self.row(int(i)) for i in batch["row"]]
        return {k: [r[k] for r in rows] for k in ("input_ids", "labels", "seq_lengths")}

    def set_epoch(self, epoch: int) -> None:
        """Repack for ``epoch`` (no-op unless ``repack_each_epoch``); same row count as epoch 0."""
        from ._bfd import pack

        if not self.repack_each_epoch or epoch == self.epoch:
            return
        base = self.seed if self.seed is not None else 0
        n_rows = self.packing.n_rows
        for attempt in range(4):
            try:
                self.packing = pack(self.lengths, self.max_length, seed=base + epoch + 7919 * attempt, n_rows=n_rows)
                self.stats["repacks"] += 1
                break
            except ValueError:
                continue
        else:  # no seed gave <= n_rows rows: keep the items together as before, shuffle row order
            self.stats["repack_fallbacks"] += 1
            logger.warning("packing: epoch %d repack needed more rows than epoch 0; kept the previous packing", epoch)
        self.epoch = epoch


def _fingerprint_token(token: str) -> str:
    return token


def _register_light_fingerprint() -> None:
    """``with_transform`` fingerprints its transform by pickling it through datasets' own pickler, which
    for a PackedRows would serialise every token (~28 s per million examples). Teach that pickler (and
    only it: DataLoader workers still get the real object) to hash a per-object token instead."""
    try:
        from datasets.utils._dill import Pickler, pklregister
    except ImportError:  # another datasets layout: hashing is just slower
        return
    if PackedRows in Pickler.dispatch:
        return

    @pklregister(PackedRows)
    def _save(pickler: Any, obj: PackedRows) -> None:
        pickler.save_reduce(_fingerprint_token, (obj.token,), obj=obj)


def pack_dataset(dataset: Any, processing_class: Any, args: Any, options: dict[str, Any]) -> tuple[Any, PackedRows]:
    """``(datasets.Dataset of packed rows, its PackedRows store)``."""
    from .._errors import PluginError

    if dataset.__class__.__name__.startswith("Iterable") or not hasattr(dataset, "__len__"):
        raise PluginError("packing needs a map-style dataset (datasets.Dataset or a list of examples); an "
                          "IterableDataset cannot be packed ahead of training: materialise it first")
    max_length = _max_length(args, options)
    cols = _columns(dataset)
    if "input_ids" not in cols:
        try:
            from trl import SFTConfig
        except ImportError:
            SFTConfig = None  # type: ignore[assignment]
        if SFTConfig is None or not isinstance(args, SFTConfig):
            raise PluginError("packing got an untokenized dataset and args that are not an SFTConfig: tokenize it "
                              "first (an 'input_ids' column, optionally 'labels' or 'completion_mask'), or use "
                              "SFTTrainer with args=SFTConfig(...)")
        dataset = _tokenize_like_sft_trainer(dataset, processing_class, args)
    completion_only = options.get("completion_only_loss", getattr(args, "completion_only_loss", None))
    tokens, labels, offsets = _flat_columns(dataset, completion_only)
    starts, lengths, stats = prepare_items(tokens, labels, offsets, max_length, options.get("overlong", "truncate"),
                                           getattr(args, "truncation_mode", "keep_start"))
    if lengths.size == 0:
        raise PluginError(f"packing: no example has a trainable token ({stats}); check the labels/masks")
    seed = options.get("seed", getattr(args, "seed", 0))
    ds = PackedRows(tokens, labels, starts, lengths, max_length, seed, bool(options.get("repack_each_epoch")), stats)
    msg = ("packing: %(examples)d examples -> %(rows)d rows of %(ml)d tokens, fill %(fill).4f; over-long %(overlong)d "
           "(split pieces %(split_pieces)d, truncated tokens %(truncated_tokens)d); dropped: %(empty)d empty, "
           "%(no_loss_dropped)d without trainable tokens")
    (logger.warning if stats["overlong"] or stats["no_loss_dropped"] or stats["empty"] else logger.info)(
        msg, {**ds.stats, "ml": max_length})
    import numpy as np
    from datasets import Dataset

    _register_light_fingerprint()
    hf = Dataset.from_dict({"row": np.arange(len(ds), dtype=np.int64)}).with_transform(ds)
    return hf, ds


@hookimpl
def sft_prepare_dataset(dataset: Any, processing_class: Any, args: Any, options: dict[str, Any]) -> Any:
    hf, rows = pack_dataset(dataset, processing_class, args, options)
    options.setdefault("_datasets", []).append(rows)
    return hf


@hookimpl
def sft_data_collator(processing_class: Any, args: Any, options: dict[str, Any]) -> Any:
    if "padding_free" in options.get("_names", []):
        return None  # padding_free supplies the same collator, plus fast attention
    from .padding_free import make_collator

    own = {k: options[k] for k in ("completion_only_loss",) if k in options}
    return make_collator(processing_class, args, own)


@hookimpl
def sft_callbacks(args: Any, options: dict[str, Any]) -> list[Any] | None:
    if not options.get("repack_each_epoch") or not options.get("_datasets"):
        return None
    from transformers import TrainerCallback

    train = options["_datasets"][0]  # prepare() transforms train_dataset first

    class RepackEachEpoch(TrainerCallback):
        """Repack before each epoch's dataloader iterator is made (on_epoch_begin runs first)."""

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            train.set_epoch(round(state.epoch or 0))

    return [RepackEachEpoch()]
