"""packing: BFD is exact and tight, nothing is dropped silently, boundaries and loss normalisation hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sft_plugins
from sft_plugins.embedded import build_dataset, build_model, build_tokenizer
from sft_plugins.plugins._bfd import bfd_assign, pack
from sft_plugins.plugins._collate import PackedCollator
from sft_plugins.plugins.packing import pack_dataset, prepare_items


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _reference_bfd_rows(lengths, capacity):
    """Item-by-item best-fit decreasing: the definition our vectorised version must reproduce."""
    space = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [(s, b) for b, s in enumerate(space) if s >= lengths[i]]
        if fits:
            space[min(fits)[1]] -= lengths[i]
        else:
            space.append(capacity - lengths[i])
    return len(space)


def test_bfd_matches_itemwise_reference():
    rng = np.random.default_rng(0)
    for _ in range(200):
        cap = int(rng.integers(8, 80))
        lengths = np.clip(rng.lognormal(np.log(cap / 4), 0.9, int(rng.integers(1, 80))).astype(int), 1, cap)
        item_bin, n = bfd_assign(lengths, cap)
        assert (item_bin >= 0).all() and np.bincount(item_bin, weights=lengths, minlength=n).max() <= cap
        assert n == _reference_bfd_rows(lengths.tolist(), cap)


def test_fill_on_long_tailed_lengths_and_nothing_dropped():
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(330), 0.8, 50_000).astype(int), 1, 2048)
    p = pack(lengths, 2048, seed=3)
    assert p.fill >= 0.995, p.fill
    assert np.array_equal(np.sort(p.row_items), np.arange(lengths.size))  # every item exactly once
    loads = np.add.reduceat(lengths[p.row_items], p.row_ptr[:-1])
    assert loads.max() <= 2048 and loads.sum() == lengths.sum()


def test_repack_keeps_row_count_and_items():
    rng = np.random.default_rng(2)
    lengths = np.clip(rng.lognormal(np.log(60), 0.8, 3000).astype(int), 1, 512)
    a = pack(lengths, 512, seed=0)
    b = pack(lengths, 512, seed=1, n_rows=a.n_rows + 5)  # fewer rows than asked: split to match
    assert b.n_rows == a.n_rows + 5
    assert np.array_equal(np.sort(b.row_items), np.arange(lengths.size))
    assert not np.array_equal(a.item_bin, b.item_bin)  # a new seed groups items differently


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


def test_packed_dataset_keeps_every_token(tok):
    from datasets import Dataset
    from trl import SFTConfig

    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(10, 500, int(n)).tolist()} for n in rng.integers(2, 90, 300)]
    args = SFTConfig(output_dir="/tmp/pk", bf16=False, use_cpu=True, report_to="none", max_length=128)
    hf, store = pack_dataset(Dataset.from_list(rows), tok, args, {})
    assert isinstance(hf, Dataset) and len(hf) == store.stats["rows"]
    assert store.stats["examples"] == 300 and store.stats["no_loss_dropped"] == 0 and store.stats["overlong"] == 0
    got = sorted(tuple(r["input_ids"][s:e]) for r in (hf[i] for i in range(len(hf)))
                 for s, e in zip(np.cumsum([0] + r["seq_lengths"][:-1]), np.cumsum(r["seq_lengths"])))
    assert got == sorted(tuple(r["input_ids"]) for r in rows)
    assert all(len(hf[i]["input_ids"]) <= 128 for i in range(len(hf)))


def test_loss_normalisation_equals_unpacked(tok):
    """Per-token CE over a packed batch, divided by the trainer's num_items_in_batch count, equals the
    mean over the same tokens run one sample at a time (what the unpacked run optimises)."""
    from datasets import Dataset
    from trl import SFTConfig

    model = build_model(tokenizer=tok)
    ds = build_dataset(12, form="text")
    samples = [tok(r["text"] + tok.eos_token)["input_ids"] for r in ds]
    args = SFTConfig(output_dir="/tmp/pk", bf16=False, use_cpu=True, report_to="none", max_length=64)
    hf, _ = pack_dataset(Dataset.from_list([{"input_ids": s} for s in samples]), tok, args, {})
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


def _train(tok, names, options=None, epochs=None, steps=6, form="conversational"):
    from trl import SFTConfig, SFTTrainer

    model = build_model(tokenizer=tok)
    extra = {"num_train_epochs": epochs} if epochs else {"max_steps": steps}
    args = SFTConfig(output_dir="/tmp/pk_sft", per_device_train_batch_size=2, bf16=False, use_cpu=True,
                     report_to="none", logging_steps=1, save_strategy="no", seed=0, learning_rate=1e-3,
                     max_length=128, gradient_checkpointing=False, disable_tqdm=True, **extra)
    stack = sft_plugins.compose(names, options=options)
    kw = stack.prepare(model=model, args=args, train_dataset=build_dataset(48, form=form, max_words=24),
                       processing_class=tok)
    trainer = SFTTrainer(**kw)
    trainer.train()
    stack.undo()
    return [r["loss"] for r in trainer.state.log_history if "loss" in r], stack, kw


def test_sft_trainer_packing_alone_and_with_padding_free(tok):
    alone, stack, kw = _train(tok, ["packing"])
    assert stack.report["data_collator"] == "packing" and isinstance(kw["data_collator"], PackedCollator)
    assert kw["args"].packing is False and kw["args"].dataset_kwargs["skip_prepare_dataset"] is True
    both, stack2, _ = _train(tok, ["packing", "padding_free"])
    assert stack2.report["data_collator"] == "padding_free" and stack2.report["train_dataset"] == "packing"
    # same packed rows, same collator class: the same run
    for a, b in zip(alone, both):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_repack_each_epoch_in_trainer(tok):
    opts = {"packing": {"repack_each_epoch": True}}
    losses, stack, kw = _train(tok, ["packing"], options=opts, epochs=2)
    store = stack.options["packing"]["_datasets"][0]
    assert store.epoch == 1 and store.stats["repacks"] + store.stats["repack_fallbacks"] == 1
    assert len(losses) > 0


def test_plain_trainer_and_refusals(tok):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": tok(r["text"])["input_ids"]} for r in build_dataset(40, form="text", max_words=24)]
    args = TrainingArguments(output_dir="/tmp/pk_tr", per_device_train_batch_size=2, max_steps=3, use_cpu=True,
                             report_to="none", save_strategy="no", disable_tqdm=True)
    model = build_model(tokenizer=tok)
    with sft_plugins.compose(["packing"], options={"packing": {"max_length": 96}}) as stack:
        kw = stack.prepare(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        assert kw["args"].remove_unused_columns is False  # keeps seq_lengths for the collator
        Trainer(**kw).train()
    # untokenized data with plain TrainingArguments: refuse, naming the fix
    with pytest.raises(sft_plugins.PluginError, match="tokenize"):
        sft_plugins.compose(["packing"], options={"packing": {"max_length": 96}}).prepare(
            model=model, args=args, train_dataset=build_dataset(8, form="text"), processing_class=tok)
    with pytest.raises(sft_plugins.PluginError, match="max_length"):
        sft_plugins.compose(["packing"]).prepare(model=model, args=args)
    with pytest.raises(sft_plugins.PluginError, match="overlong"):
        sft_plugins.compose(["packing"], options={"packing": {"max_length": 8, "overlong": "drop"}}).prepare(
            model=model, args=args)
    assert sft_plugins.compose(["packing"]).describe()["packing"]["loss_parity"] is None
