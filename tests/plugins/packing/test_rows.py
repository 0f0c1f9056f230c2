"""packing's rows (``packing/rows.py``): over-long examples split or truncated and counted, examples without a
trainable token dropped and counted, every token kept in some row, and the packed loss normalised as the
unpacked one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sft_plugins
from sft_plugins.embedded import build_dataset, build_model
from sft_plugins.plugins.packing.rows import pack_dataset, prepare_items
from sft_plugins.plugins.shared import PackedCollator


@pytest.fixture(scope="module")
def options():
    """The packing plugin's options as its hooks get them: the schema's defaults, filled in by compose()."""
    return sft_plugins.compose(["packing"]).options["packing"]


def test_overlong_split_truncate_and_no_loss_counted():
    tokens = np.arange(30, dtype=np.int32)
    labels = tokens.copy()
    labels[20:30] = -100  # the third example has no trainable token
    offsets = np.array([0, 12, 20, 30])
    starts, lengths, stats = prepare_items(tokens, labels, offsets, 5, "split")
    assert stats["overlong"] == 3 and stats["split_pieces"] == 3 + 2 + 2 and stats["no_loss_dropped"] == 2
    # the split pieces cover all trainable tokens; two all-masked pieces of example 3 are dropped
    assert lengths.sum() == 20 and lengths.max() <= 5
    starts, lengths, stats = prepare_items(tokens, labels, offsets, 5, "truncate")
    assert stats["truncated_tokens"] == 7 + 3 + 5 and stats["no_loss_dropped"] == 1
    assert lengths.tolist() == [5, 5] and starts.tolist() == [0, 12]
    starts, _, _ = prepare_items(tokens, labels, offsets, 5, "truncate", truncation_mode="keep_end")
    assert starts.tolist() == [7, 15]


def test_packed_dataset_keeps_every_token(tok, options):
    from datasets import Dataset
    from trl import SFTConfig

    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(10, 500, int(n)).tolist()} for n in rng.integers(2, 90, 300)]
    args = SFTConfig(output_dir="/tmp/pk", bf16=False, use_cpu=True, report_to="none", max_length=128)
    hf, store = pack_dataset(Dataset.from_list(rows), tok, args, options)
    assert isinstance(hf, Dataset) and len(hf) == store.stats["rows"]
    assert store.stats["examples"] == 300 and store.stats["no_loss_dropped"] == 0 and store.stats["overlong"] == 0
    got = sorted(tuple(r["input_ids"][s:e]) for r in (hf[i] for i in range(len(hf)))
                 for s, e in zip(np.cumsum([0] + r["seq_lengths"][:-1]), np.cumsum(r["seq_lengths"])))
    assert got == sorted(tuple(r["input_ids"]) for r in rows)
    assert all(len(hf[i]["input_ids"]) <= 128 for i in range(len(hf)))


def test_loss_normalisation_equals_unpacked(tok, options):
    """Per-token CE over a packed batch, divided by the trainer's num_items_in_batch count, equals the
    mean over the same tokens run one sample at a time (what the unpacked run optimises)."""
    from datasets import Dataset
    from trl import SFTConfig

    model = build_model(tokenizer=tok)
    ds = build_dataset(12, form="text")
    samples = [tok(r["text"] + tok.eos_token)["input_ids"] for r in ds]
    args = SFTConfig(output_dir="/tmp/pk", bf16=False, use_cpu=True, report_to="none", max_length=64)
    hf, _ = pack_dataset(Dataset.from_list([{"input_ids": s} for s in samples]), tok, args, options)
    batch = PackedCollator(pad_token_id=tok.pad_token_id)([hf[i] for i in range(len(hf))])
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits[0]
        labels = batch["labels"][0]
        n_items = labels[1:].ne(-100).sum()  # transformers' count: labels[..., 1:]
        packed = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100,
                                                   reduction="sum") / n_items
        per_tok = []
        for s in samples:
            ids = torch.tensor(s)
            lg = model(input_ids=ids[None], use_cache=False).logits[0]
            per_tok.append(torch.nn.functional.cross_entropy(lg[:-1], ids[1:], reduction="none"))
        unpacked = torch.cat(per_tok).mean()
    assert int(n_items) == sum(len(s) - 1 for s in samples)
    torch.testing.assert_close(packed, unpacked, atol=1e-5, rtol=1e-5)
