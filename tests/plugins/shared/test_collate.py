"""The padding-free collator shared by padding_free and packing (``plugins/shared/collate.py``): one flattened
row, restarting position_ids, cu_seq_lens, no attention mask, labels masked at sequence starts, padding as
its own masked sequence, completion/assistant masks honoured."""

from __future__ import annotations

import torch

from sft_plugins.plugins.shared import PackedCollator, build_labels


def test_collator_layout():
    out = PackedCollator(pad_token_id=0)([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert out["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 5] and out["cu_seq_lens_q"].dtype == torch.int32
    assert out["max_length_q"] == out["max_length_k"] == 3
    assert "attention_mask" not in out  # an all-ones mask would disable packed-sequence detection


def test_collator_masks_packed_rows_and_padding():
    c = PackedCollator(pad_token_id=9, pad_to_multiple_of=8)
    out = c([{"input_ids": [1, 2, 3, 4, 5], "seq_lengths": [2, 3], "completion_mask": [0, 1, 0, 1, 1]},
             {"input_ids": [6, 7, 8], "assistant_masks": [1, 1, 0]}])
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]  # already a multiple of 8
    assert out["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]]
    assert out["labels"].tolist() == [[-100, 2, -100, 4, 5, -100, 7, -100]]
    out = c([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}])
    assert out["input_ids"].tolist() == [[1, 2, 3, 9, 9, 9, 9, 9]]
    assert out["labels"].tolist() == [[-100, 2, 3] + [-100] * 5]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]  # padding is its own sequence
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 8]
    # completion_only_loss=False keeps prompt tokens, like SFTTrainer
    out = PackedCollator(completion_only_loss=False)([{"input_ids": [1, 2, 3], "completion_mask": [0, 0, 1]}])
    assert out["labels"].tolist() == [[-100, 2, 3]]


def test_build_labels():
    assert build_labels({"input_ids": [1, 2, 3]}).tolist() == [1, 2, 3]
    assert build_labels({"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]}).tolist() == [-100, 2, 3]
    assert build_labels({"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]},
                        completion_only_loss=False).tolist() == [1, 2, 3]
    assert build_labels({"input_ids": [1, 2, 3], "labels": [-100, -100, 3]}).tolist() == [-100, -100, 3]
