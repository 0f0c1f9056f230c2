"""packing keeps what SFTTrainer would train on: formatting_func, assistant and completion masks, exact
resume of a repacked epoch; NEFTune, which it cannot keep, is refused."""

from __future__ import annotations

import numpy as np
import pytest

import sft_plugins
from sft_plugins import PluginError
from sft_plugins.embedded import build_dataset, build_model, build_tokenizer, records

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _args(tmp_path, **overrides):
    from trl import SFTConfig

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, bf16=False, use_cpu=True, report_to="none",
                logging_steps=1, save_strategy="no", seed=0, learning_rate=1e-3, max_length=512,
                gradient_checkpointing=False, disable_tqdm=True, max_steps=2)
    return SFTConfig(**{**base, **overrides})


def _baseline_examples(tok, args, dataset, **trainer_kwargs):
    """What the unmodified SFTTrainer trains on: its prepared train_dataset, labels per example."""
    from trl import SFTTrainer

    trainer = SFTTrainer(model=build_model(tokenizer=tok), args=args, train_dataset=dataset, processing_class=tok,
                         **trainer_kwargs)
    ids, labels = [], []
    for ex in trainer.train_dataset:
        x = np.asarray(ex["input_ids"])
        ids.append(x)
        if ex.get("labels") is not None:  # TRL builds the labels (masks applied) during preparation
            labels.append(np.asarray(ex["labels"]))
            continue
        keep = np.ones_like(x, dtype=bool)
        if ex.get("assistant_masks") is not None:
            keep &= np.asarray(ex["assistant_masks"], dtype=bool)
        if ex.get("completion_mask") is not None and trainer.completion_only_loss:
            keep &= np.asarray(ex["completion_mask"], dtype=bool)
        labels.append(np.where(keep, x, -100))
    return np.concatenate(ids), np.concatenate(labels)


def _packed_examples(stack):
    """The packed store's tokens and labels, item by item in dataset order (before BFD's row order)."""
    rows = stack.state_of("packing").train_rows
    order = np.argsort(rows.starts)
    take = np.concatenate([np.arange(rows.starts[i], rows.starts[i] + rows.lengths[i]) for i in order])
    return rows.tokens[take], rows.labels[take]


def _alpaca(n=24):
    # instruction/output plus a `text` column of other words: what a formatting_func must win over
    return [{"instruction": r["prompt"], "output": r["completion"], "text": "zzz other words " * 5}
            for r in records(n, form="prompt_completion", max_words=20)]


def _format(example):
    return f"### Instruction:\n{example['instruction']}### Response:\n{example['output']}"


def test_formatting_func_is_applied_not_the_text_column(tmp_path, tok):
    from datasets import Dataset
    from trl import SFTTrainer

    dataset = Dataset.from_list(_alpaca())
    args = _args(tmp_path)
    want_ids, want_labels = _baseline_examples(tok, args, dataset, formatting_func=_format)
    stack = sft_plugins.compose(["packing"])
    kw = stack.prepare(model=build_model(tokenizer=tok), args=args, train_dataset=dataset, processing_class=tok,
                       formatting_func=_format)
    got_ids, got_labels = _packed_examples(stack)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_labels, want_labels)
    other = set(tok("zzz other words")["input_ids"]) - set(tok(_format(dataset[0]))["input_ids"])
    assert not other & set(got_ids.tolist())  # not one token of the decoy column
    SFTTrainer(**kw).train()
    stack.undo()


def test_no_text_and_no_formatting_func_is_a_plugin_error(tmp_path, tok):
    from datasets import Dataset

    dataset = Dataset.from_list([{k: v for k, v in r.items() if k != "text"} for r in _alpaca(8)])
    stack = sft_plugins.compose(["packing"])
    with pytest.raises(PluginError, match="formatting_func"):
        stack.prepare(model=build_model(tokenizer=tok), args=_args(tmp_path), train_dataset=dataset,
                      processing_class=tok)


def test_formatting_func_with_completion_only_loss_is_refused_like_trl(tmp_path, tok):
    from datasets import Dataset

    stack = sft_plugins.compose(["packing"])
    with pytest.raises(PluginError, match="completion_only_loss"):
        stack.prepare(model=build_model(tokenizer=tok), args=_args(tmp_path, completion_only_loss=True),
                      train_dataset=Dataset.from_list(_alpaca(8)), processing_class=tok, formatting_func=_format)


@pytest.mark.parametrize("form, loss_args", [
    ("conversational", {"assistant_only_loss": True}),
    ("prompt_completion", {}),                               # TRL's default: completion only
    ("prompt_completion", {"completion_only_loss": False}),
])
def test_loss_masks_are_the_baselines(tmp_path, tok, form, loss_args):
    from trl import SFTTrainer

    dataset = build_dataset(24, form=form, max_words=20)
    args = _args(tmp_path, **loss_args)
    want_ids, want_labels = _baseline_examples(tok, args, dataset)
    stack = sft_plugins.compose(["packing"])
    kw = stack.prepare(model=build_model(tokenizer=tok), args=args, train_dataset=dataset, processing_class=tok)
    got_ids, got_labels = _packed_examples(stack)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_labels, want_labels)
    assert 0 < (got_labels != -100).mean() < 1 or loss_args.get("completion_only_loss") is False
    assert kw["args"].assistant_only_loss is False  # the masks are in the labels; the trainer must not redo them
    trainer = SFTTrainer(**kw)  # the baseline builds with the same template; so must the packed arm
    trainer.train()
    stack.undo()


def _run(tmp_path, tok, *, max_steps, resume=None, save_steps=None):
    from trl import SFTTrainer

    args = _args(tmp_path, max_steps=max_steps, num_train_epochs=3, max_length=64,
                 save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500)
    stack = sft_plugins.compose(["packing"], options={"packing": {"repack_each_epoch": True}})
    kw = stack.prepare(model=build_model(tokenizer=tok), args=args,
                       train_dataset=build_dataset(40, form="text", max_words=20), processing_class=tok)
    trainer = SFTTrainer(**kw)
    trainer.train(resume_from_checkpoint=resume)
    stack.undo()
    steps_per_epoch = len(trainer.get_train_dataloader())
    return {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}, steps_per_epoch


def test_resume_mid_epoch_trains_on_the_same_packing(tmp_path, tok):
    full, per_epoch = _run(tmp_path / "full", tok, max_steps=-1)
    total = 3 * per_epoch
    stop = per_epoch + per_epoch // 2 + 1  # inside the second epoch, past its middle
    assert per_epoch >= 4 and (stop / per_epoch) % 1 > 0.5
    _run(tmp_path / "cut", tok, max_steps=-1, save_steps=stop)
    resumed, _ = _run(tmp_path / "cut", tok, max_steps=-1, resume=str(tmp_path / "cut" / f"checkpoint-{stop}"))
    resumed = {step: loss for step, loss in resumed.items() if step > stop}  # the history holds the first part too
    assert sorted(resumed) == list(range(stop + 1, total + 1))
    for step, loss in resumed.items():
        assert abs(loss - full[step]) <= 1e-5 * abs(full[step]), (step, loss, full[step])


@pytest.mark.parametrize("name", ["packing", "padding_free"])
def test_neftune_is_refused(tmp_path, tok, name):
    stack = sft_plugins.compose([name])
    with pytest.raises(PluginError, match="neftune_noise_alpha"):
        stack.prepare(model=build_model(tokenizer=tok), args=_args(tmp_path, neftune_noise_alpha=5.0),
                      train_dataset=build_dataset(8), processing_class=tok)
