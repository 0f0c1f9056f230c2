"""The packed dataset: SFTTrainer's own preparation, over-long examples split or truncated, best-fit-decreasing
rows (:mod:`.bfd`) served lazily from two flat token arrays, and repacked per epoch on request."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from ..._errors import PluginError
from ..shared import build_labels
from .bfd import pack

logger = logging.getLogger("sft_plugins.packing")


def row_length(args: Any, options: dict[str, Any]) -> int | None:
    """Tokens per packed row: the option, else ``args.max_length``."""
    value = options["max_length"] if options.get("max_length") is not None else getattr(args, "max_length", None)
    return int(value) if value is not None else None


def user_loss_args(args: Any) -> dict[str, Any]:
    """The loss-mask fields of ``args`` (``assistant_only_loss``, ``completion_only_loss``) it has."""
    return {k: getattr(args, k) for k in ("assistant_only_loss", "completion_only_loss") if hasattr(args, k)}


def _tokenize_like_sft_trainer(dataset: Any, processing_class: Any, args: Any, formatting_func: Any,
                               loss_args: dict[str, Any]) -> Any:
    """Run SFTTrainer's own dataset preparation (formatting_func, conversion, EOS, chat template,
    tokenization, prompt-completion and assistant masks) without truncation or packing, so packed rows
    hold exactly what SFTTrainer would have trained on. ``loss_args`` are the user's
    ``assistant_only_loss`` / ``completion_only_loss`` (the trainer's own copy of the args has them
    off: the masks are in our labels by then)."""
    import dataclasses
    from types import SimpleNamespace

    from trl import SFTTrainer
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    tok = getattr(processing_class, "tokenizer", processing_class)
    if tok is None:
        raise PluginError("packing must tokenize this dataset: pass processing_class=<tokenizer> to prepare()")
    raw_args = dataclasses.replace(args, max_length=None, packing=False, shuffle_dataset=False, **loss_args)
    sample = next(iter(dataset))
    completion_only = raw_args.completion_only_loss
    if completion_only is None:
        completion_only = "prompt" in sample and "completion" in sample
    if completion_only and formatting_func is not None:
        raise PluginError("a formatting_func turns the dataset into plain text, so completion_only_loss=True has no "
                          "completion to train on (SFTTrainer refuses the same): apply the formatting yourself and "
                          "pass prompt/completion columns, or set SFTConfig(completion_only_loss=False)")
    chat_template = None
    if raw_args.assistant_only_loss:
        from trl.data_utils import is_conversational

        if not is_conversational(sample):
            raise PluginError("assistant_only_loss=True needs a conversational dataset ('messages' or "
                              "prompt/completion turns): SFTTrainer refuses it too; drop assistant_only_loss")
        if not has_generation_markers(tok.chat_template):
            chat_template = get_training_chat_template(tok)
    shim = SimpleNamespace(_tokenizer=tok, completion_only_loss=completion_only, chat_template=chat_template)
    try:
        return SFTTrainer._prepare_dataset(shim, dataset, processing_class, raw_args, False, formatting_func, "train")
    except KeyError as exc:
        columns = sorted(_columns(dataset))
        raise PluginError(f"packing could not read the text of this dataset (no column {exc}; it has {columns}): "
                          "pass formatting_func=..., name the text column with SFTConfig(dataset_text_field=...), "
                          "or use 'messages' / 'prompt'+'completion' columns") from exc


def _columns(dataset: Any) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:
        names = list(dataset[0].keys())
    return list(names)


def _flat_columns(dataset: Any, completion_only_loss: bool | None) -> tuple[Any, Any, Any]:
    """``(tokens, labels, offsets)`` as flat numpy arrays of all examples (``labels is tokens`` when the
    dataset has no labels or masks: every token is a label)."""
    import numpy as np

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


def pack_dataset(dataset: Any, processing_class: Any, args: Any, options: dict[str, Any], *,
                 formatting_func: Any = None, loss_args: dict[str, Any] | None = None) -> tuple[Any, PackedRows]:
    """``(datasets.Dataset of packed rows, its PackedRows store)``; ``options`` as validated by the schema.

    ``formatting_func`` is SFTTrainer's; ``loss_args`` the user's ``assistant_only_loss`` /
    ``completion_only_loss`` when the args given here are the trainer's copy (default: read from ``args``).
    Options not given take the schema's defaults."""
    from ..._options import option_defaults
    from . import OPTIONS

    options = {**option_defaults(OPTIONS), **options}
    loss_args = dict(loss_args if loss_args is not None else user_loss_args(args))
    if dataset.__class__.__name__.startswith("Iterable") or not hasattr(dataset, "__len__"):
        raise PluginError("packing needs a map-style dataset (datasets.Dataset or a list of examples); an "
                          "IterableDataset cannot be packed ahead of training: materialise it first")
    max_length = row_length(args, options)
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
        dataset = _tokenize_like_sft_trainer(dataset, processing_class, args, formatting_func, loss_args)
    elif formatting_func is not None:  # as SFTTrainer does: the tokens are already there
        logger.warning("packing: the dataset is already tokenized ('input_ids'), so formatting_func is ignored "
                       "(SFTTrainer ignores it too); drop it, or pass the raw dataset")
    completion_only = options["completion_only_loss"]
    if completion_only is None:
        completion_only = loss_args.get("completion_only_loss")
    tokens, labels, offsets = _flat_columns(dataset, completion_only)
    starts, lengths, stats = prepare_items(tokens, labels, offsets, max_length, options["overlong"],
                                           getattr(args, "truncation_mode", "keep_start"))
    if lengths.size == 0:
        raise PluginError(f"packing: no example has a trainable token ({stats}); check the labels/masks")
    seed = options["seed"] if options["seed"] is not None else getattr(args, "seed", 0)
    ds = PackedRows(tokens, labels, starts, lengths, max_length, seed, options["repack_each_epoch"], stats)
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


