"""The padding-free collator shared by the padding_free and packing plugins, and label building.

A batch of tokenized examples becomes ONE row: ``input_ids``/``labels``/``position_ids`` of shape
``[1, T]`` (T = real tokens), ``position_ids`` restarting at 0 for every sequence, the first label of
every sequence set to -100 (it would otherwise be predicted from the previous sequence's last token),
``cu_seq_lens_q/k`` (int32, ``[n_seq + 1]``) and ``max_length_q/k`` for varlen kernels, and **no
attention_mask**: transformers only detects packed sequences from ``position_ids`` when the mask is
None; an all-ones mask would let the sequences attend to each other.

Examples may be packed rows already (a ``seq_lengths`` list, as the packing plugin and TRL's BFD
produce); each of their sequences gets its own positions and boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def build_labels(example: Mapping[str, Any], completion_only_loss: bool | None = None) -> np.ndarray:
    """Labels of one tokenized example, the way TRL's SFTTrainer builds them during preparation.

    An existing ``labels`` column is used as is; otherwise ``input_ids`` with -100 where
    ``assistant_masks`` is 0 (always applied) and where ``completion_mask`` is 0 (applied unless
    ``completion_only_loss`` is False; TRL's default for prompt/completion data is True).
    """
    ids = np.asarray(example["input_ids"], dtype=np.int64)
    if example.get("labels") is not None:
        return np.asarray(example["labels"], dtype=np.int64)
    labels = ids.copy()
    masks = []
    if example.get("assistant_masks") is not None:
        masks.append(example["assistant_masks"])
    if completion_only_loss is not False and example.get("completion_mask") is not None:
        masks.append(example["completion_mask"])
    for m in masks:
        m = np.asarray(m)
        if m.shape != ids.shape:
            raise ValueError(f"mask of length {m.size} does not match input_ids of length {ids.size}")
        labels[m == 0] = -100
    return labels


@dataclass
class PackedCollator:
    """Flatten a batch into one padding-free row (see the module docstring).

    ``pad_to_multiple_of`` appends pad tokens as one extra masked sequence (own positions, labels
    -100, own ``cu_seq_lens`` entry), so the row length is a multiple of it without any sequence
    attending to padding.
    """

    pad_token_id: int = 0
    completion_only_loss: bool | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        if not examples:
            raise ValueError("PackedCollator got an empty batch")
        ids_parts, label_parts, lens = [], [], []
        for ex in examples:
            if "input_ids" not in ex:
                raise ValueError("PackedCollator needs tokenized examples (an 'input_ids' field); got keys "
                                 f"{sorted(ex)}. With plain transformers.Trainer, tokenize the dataset first.")
            ids = np.asarray(ex["input_ids"], dtype=np.int64)
            labels = build_labels(ex, self.completion_only_loss)
            seq = ex.get("seq_lengths")
            seq = [int(x) for x in seq] if seq is not None else [int(ids.size)]
            if sum(seq) != ids.size:
                raise ValueError(f"seq_lengths sum to {sum(seq)} but the row has {ids.size} tokens")
            ids_parts.append(ids)
            label_parts.append(labels)
            lens.extend(x for x in seq if x > 0)
        input_ids = np.concatenate(ids_parts)
        labels = np.concatenate(label_parts)
        lens_arr = np.asarray(lens, dtype=np.int64)
        total = int(input_ids.size)
        if self.pad_to_multiple_of and total % self.pad_to_multiple_of:
            extra = self.pad_to_multiple_of - total % self.pad_to_multiple_of
            input_ids = np.concatenate([input_ids, np.full(extra, self.pad_token_id, dtype=np.int64)])
            labels = np.concatenate([labels, np.full(extra, -100, dtype=np.int64)])
            lens_arr = np.append(lens_arr, extra)
            total += extra
        cu = np.zeros(lens_arr.size + 1, dtype=np.int64)
        np.cumsum(lens_arr, out=cu[1:])
        starts = cu[:-1]
        position_ids = np.arange(total, dtype=np.int64) - np.repeat(starts, lens_arr)
        labels = labels.copy()
        labels[starts] = -100  # first token of each sequence: nothing before it in its own sequence
        cu_t = torch.from_numpy(cu.astype(np.int32))
        max_len = int(lens_arr.max())
        return {
            "input_ids": torch.from_numpy(input_ids)[None],
            "labels": torch.from_numpy(labels)[None],
            "position_ids": torch.from_numpy(position_ids)[None],
            "cu_seq_lens_q": cu_t,
            "cu_seq_lens_k": cu_t,
            "max_length_q": max_len,
            "max_length_k": max_len,
        }


def make_packed_collator(processing_class: Any, args: Any, *, completion_only_loss: bool | None = None,
                         pad_to_multiple_of: int | None = None) -> PackedCollator:
    """A :class:`PackedCollator` padding with the tokenizer's pad (or EOS) token; ``None`` options fall back
    to the args' ``completion_only_loss`` / ``pad_to_multiple_of``, as TRL's own collator does."""
    tok = getattr(processing_class, "tokenizer", processing_class)
    pad = getattr(tok, "pad_token_id", None)
    if pad is None:
        pad = getattr(tok, "eos_token_id", None) or 0
    if completion_only_loss is None:
        completion_only_loss = getattr(args, "completion_only_loss", None)
    if pad_to_multiple_of is None:
        pad_to_multiple_of = getattr(args, "pad_to_multiple_of", None)
    return PackedCollator(pad_token_id=int(pad), completion_only_loss=completion_only_loss,
                          pad_to_multiple_of=pad_to_multiple_of)
