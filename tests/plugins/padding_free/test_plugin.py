"""padding_free as a plugin: packed rows equal each sample alone (loss and gradients), the traps it avoids,
its refusals (bad options at compose(), the rest at prepare()), and loss parity in SFTTrainer and Trainer."""

from __future__ import annotations

import pytest
import torch

import sft_plugins
from sft_plugins.embedded import build_dataset, build_model
from sft_plugins.plugins.shared import PackedCollator

from .helpers import CUDA, alone, assert_same, packed, packed_registry, samples_of, token_losses


# -- the central test: packed == alone, loss and gradients, fp32 -----------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_equals_alone_cpu(tok, impl):
    model = build_model(tokenizer=tok, attn_implementation=impl)
    samples = samples_of(tok)
    batch = PackedCollator(pad_token_id=tok.pad_token_id)([{"input_ids": s} for s in samples])
    assert_same(alone(model, samples), packed(model, batch, samples))


# -- the traps --------------------------------------------------------------------------------------
def test_all_ones_mask_trap(tok):
    """An all-ones attention mask next to packed position_ids lets sequences see each other; our
    collator sends none, so they stay apart."""
    model = build_model(tokenizer=tok)
    samples = samples_of(tok, 2)
    batch = PackedCollator(pad_token_id=tok.pad_token_id)([{"input_ids": s} for s in samples])
    ref = alone(model, samples)
    assert_same(ref, packed(model, batch, samples))
    trapped = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))
    with pytest.raises(AssertionError):
        assert_same(ref, packed(model, trapped, samples))


def test_cache_trap_and_our_patch(tok):
    """With the default use_cache=True, transformers skips packed-sequence detection (the second
    sequence attends to the first); the plugin sets config.use_cache=False, as plain Trainer needs."""
    model = build_model(tokenizer=tok)
    samples = samples_of(tok, 2)
    batch = PackedCollator(pad_token_id=tok.pad_token_id)([{"input_ids": s} for s in samples])
    ids = batch["input_ids"][0]
    cu = batch["cu_seq_lens_q"].tolist()
    ref = alone(model, samples)[0]

    def second_seq_loss():
        with torch.no_grad():
            logits = model(**batch).logits[0]  # no use_cache argument: the config decides, as in Trainer
        return token_losses(logits[cu[1]:cu[2]], ids[cu[1]:cu[2]])

    assert model.config.use_cache is True
    assert not torch.allclose(second_seq_loss(), ref[1], atol=1e-4)  # the trap is real
    stack = sft_plugins.compose(["padding_free"])
    stack.prepare(model=model)
    torch.testing.assert_close(second_seq_loss(), ref[1], atol=1e-5, rtol=1e-5)
    stack.undo()
    assert model.config.use_cache is True


# -- refusals ---------------------------------------------------------------------------------------
def test_bad_options_fail_at_compose():
    unknown = "bad options for padding_free:(.|\n)*unknown option 'bogus'"
    with pytest.raises(sft_plugins.PluginError, match=unknown):
        sft_plugins.compose(["padding_free"], options={"padding_free": {"bogus": 1}})
    with pytest.raises(sft_plugins.PluginError, match="option 'attention' must be .*got 'fast'"):
        sft_plugins.compose(["padding_free"], options={"padding_free": {"attention": "fast"}})
    with pytest.raises(sft_plugins.PluginError, match="option 'pad_to_multiple_of' must be int >= 1"):
        sft_plugins.compose(["padding_free"], options={"padding_free": {"pad_to_multiple_of": 0}})


def test_refusals(tok):
    from trl import SFTConfig

    model = build_model(tokenizer=tok)
    args = SFTConfig(output_dir="/tmp/pf", bf16=False, use_cpu=True, report_to="none", packing=True)
    with pytest.raises(sft_plugins.PluginError, match="packing"):
        sft_plugins.compose(["padding_free"]).prepare(model=model, args=args)
    if not CUDA:
        with pytest.raises(sft_plugins.PluginError, match="CUDA"):
            sft_plugins.compose(["padding_free"], options={"padding_free": {"attention": "varlen"}}).prepare(model=model)
    with pytest.raises(sft_plugins.PluginError, match="flash"):
        sft_plugins.compose(["padding_free"], options={"padding_free": {"attention": "flash"}}).prepare(model=model)
    assert model.config._attn_implementation == "sdpa"  # nothing left patched
    assert packed_registry() == {"AttentionInterface": set(), "AttentionMaskInterface": set()}


def test_describe_and_args_never_mutated(tok):
    from trl import SFTConfig

    stack = sft_plugins.compose(["padding_free"])
    assert stack.describe()["padding_free"]["loss_parity"] == 1e-3
    args = SFTConfig(output_dir="/tmp/pf", bf16=False, use_cpu=True, report_to="none", padding_free=True,
                     max_length=None)
    out = stack.prepare(model=build_model(tokenizer=tok), args=args)
    assert out["args"].padding_free is False and out["args"].remove_unused_columns is False
    assert args.padding_free is True and isinstance(out["data_collator"], PackedCollator)
    stack.undo()


# -- loss-curve parity in a real SFTTrainer ---------------------------------------------------------
def _sft_losses(tok, names, form, steps=20, **kw):
    # short examples (max_words=24) keep 2 x 20 steps within a few seconds on a shared 2-core CPU
    from trl import SFTConfig, SFTTrainer

    model = build_model(tokenizer=tok)
    args = SFTConfig(output_dir="/tmp/pf_sft", per_device_train_batch_size=4, max_steps=steps, bf16=False,
                     use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", seed=0,
                     learning_rate=1e-3, max_length=256, gradient_checkpointing=False, disable_tqdm=True, **kw)
    with sft_plugins.compose(names) as stack:
        trainer = SFTTrainer(**stack.prepare(model=model, args=args, train_dataset=build_dataset(96, form=form, max_words=24),
                                             processing_class=tok))
        trainer.train()
    return [r["loss"] for r in trainer.state.log_history if "loss" in r], trainer


@pytest.mark.parametrize("form,steps,kw", [("conversational", 20, {}), ("prompt_completion", 8, {}),
                                           ("conversational", 8, {"assistant_only_loss": True})])
def test_sft_trainer_loss_parity(tok, form, steps, kw):
    base, _ = _sft_losses(tok, [], form, steps, **kw)
    ours, trainer = _sft_losses(tok, ["padding_free"], form, steps, **kw)
    assert len(base) == len(ours) == steps
    for step, (a, b) in enumerate(zip(base, ours)):
        assert abs(a - b) <= 1e-3 * abs(a), (step, a, b)
    assert isinstance(trainer.data_collator, PackedCollator)


def test_plain_trainer_tokenized_completion_mask(tok):
    """Plain transformers.Trainer on a tokenized dataset with completion_mask: our collator applies
    the mask (remove_unused_columns=False keeps it) and matches a padded, pre-labelled baseline."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    recs = build_dataset(64, form="prompt_completion")
    rows = []
    for r in recs:
        p, c = tok(r["prompt"])["input_ids"], tok(r["completion"] + tok.eos_token)["input_ids"]
        rows.append({"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)})
    ds = Dataset.from_list(rows)
    labelled = ds.map(lambda e: {"labels": [t if m else -100 for t, m in zip(e["input_ids"], e["completion_mask"])]},
                      remove_columns=["completion_mask"])

    def losses(names, dataset, collator):
        model = build_model(tokenizer=tok)
        args = TrainingArguments(output_dir="/tmp/pf_tr", per_device_train_batch_size=4, max_steps=6, use_cpu=True,
                                 report_to="none", logging_steps=1, save_strategy="no", seed=0, learning_rate=1e-3,
                                 disable_tqdm=True)
        with sft_plugins.compose(names) as stack:
            kw = stack.prepare(model=model, args=args, train_dataset=dataset, processing_class=tok)
            if collator is not None:
                kw["data_collator"] = collator
            trainer = Trainer(**kw)
            trainer.train()
        return [r["loss"] for r in trainer.state.log_history if "loss" in r]

    base = losses([], labelled, DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id))
    ours = losses(["padding_free"], ds, None)
    assert len(base) == len(ours) == 6
    for a, b in zip(base, ours):
        assert abs(a - b) <= 1e-3 * abs(a), (a, b)
