"""packing as a plugin: SFTTrainer alone and with padding_free (same rows, same run), repacking each epoch
through this stack's own rows, plain Trainer on tokenized data, and the refusals (bad options at compose(),
the rest at prepare())."""

from __future__ import annotations

import pytest

import sft_plugins
from sft_plugins.embedded import build_dataset, build_model
from sft_plugins.plugins.shared import PackedCollator


def _train(tok, names, options=None, epochs=None, steps=6, form="conversational"):
    """Train, undo; returns the logged losses, the stack, the trainer kwargs and packing's per-stack state
    (read before undo(), which drops it from the stack)."""
    from trl import SFTConfig, SFTTrainer

    model = build_model(tokenizer=tok)
    extra = {"num_train_epochs": epochs} if epochs else {"max_steps": steps}
    args = SFTConfig(output_dir="/tmp/pk_sft", per_device_train_batch_size=2, bf16=False, use_cpu=True,
                     report_to="none", logging_steps=1, save_strategy="no", seed=0, learning_rate=1e-3,
                     max_length=128, gradient_checkpointing=False, disable_tqdm=True, **extra)
    stack = sft_plugins.compose(names, options=options)
    kw = stack.prepare(model=model, args=args, train_dataset=build_dataset(48, form=form, max_words=24),
                       processing_class=tok)
    state = stack.state_of("packing")
    trainer = SFTTrainer(**kw)
    trainer.train()
    stack.undo()
    assert stack.state_of("packing") is None
    return [r["loss"] for r in trainer.state.log_history if "loss" in r], stack, kw, state


def test_sft_trainer_packing_alone_and_with_padding_free(tok):
    alone, stack, kw, _ = _train(tok, ["packing"])
    assert stack.report["data_collator"] == "packing" and isinstance(kw["data_collator"], PackedCollator)
    assert kw["args"].packing is False and kw["args"].dataset_kwargs["skip_prepare_dataset"] is True
    both, stack2, _, _ = _train(tok, ["packing", "padding_free"])
    assert stack2.report["data_collator"] == "padding_free" and stack2.report["train_dataset"] == "packing"
    # same packed rows, same collator class: the same run
    assert len(alone) == len(both) == 6
    for a, b in zip(alone, both):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_repack_each_epoch_in_trainer(tok):
    opts = {"packing": {"repack_each_epoch": True}}
    losses, stack, kw, state = _train(tok, ["packing"], options=opts, epochs=2)
    store = state.train_rows  # this stack's train rows, repacked by its own callback
    (repack,) = [cb for cb in kw["callbacks"] if type(cb).__name__ == "RepackEachEpoch"]
    assert repack.rows is store
    assert store.epoch == 1 and store.stats["repacks"] + store.stats["repack_fallbacks"] == 1
    assert len(losses) > 0
    # without the option there is no callback
    _, _, kw, state = _train(tok, ["packing"], steps=1)
    assert state.train_rows is not None
    assert not any(type(cb).__name__ == "RepackEachEpoch" for cb in kw.get("callbacks") or [])


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
    assert sft_plugins.compose(["packing"]).describe()["packing"]["loss_parity"] is None


def test_bad_options_fail_at_compose():
    with pytest.raises(sft_plugins.PluginError, match="option 'overlong' must be 'truncate' \\| 'split', got 'drop'"):
        sft_plugins.compose(["packing"], options={"packing": {"max_length": 8, "overlong": "drop"}})
    with pytest.raises(sft_plugins.PluginError, match="option 'max_length' must be int >= 2"):
        sft_plugins.compose(["packing"], options={"packing": {"max_length": 1}})
    with pytest.raises(sft_plugins.PluginError, match="unknown option 'repack'"):
        sft_plugins.compose(["packing"], options={"packing": {"repack": True}})
