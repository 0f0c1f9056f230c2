"""smart_checkpointing in real trainers: SFTTrainer (LoRA, TRL's default gradient_checkpointing=True turned
off in the trainer's copy of the args) and Trainer (full fine-tuning) train as without checkpointing, and
checkpointing re-enabled after prepare() is caught."""

from __future__ import annotations

import pytest
import torch

import sft_plugins
from sft_plugins import PluginError
from sft_plugins.embedded import build_dataset, build_model
from sft_plugins.plugins import smart_checkpointing as sc

from .helpers import NAME, logged_losses, make_model, needs_cuda, sft

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sfttrainer_lora_parity(tok):
    _, base, _ = sft(tok, [], args_kw={"gradient_checkpointing": False})
    base.train()
    stack, ours, model = sft(tok, [NAME])  # TRL's default gradient_checkpointing=True: the plugin turns it off
    assert not (getattr(ours.args, "activation_checkpointing", None) or ours.args.gradient_checkpointing)
    ours.train()
    calls = sc.stats(model)["calls"]
    stack.undo()
    assert calls == 20 * 2
    a, b = logged_losses(base), logged_losses(ours)
    assert len(a) == 20 and a == pytest.approx(b, rel=1e-5)
    for (n, p), (m, q) in zip(base.model.named_parameters(), ours.model.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_stats_of_the_trainers_peft_wrapped_model(tok):
    stack, trainer, model = sft(tok, [NAME], args_kw={"max_steps": 1})
    try:
        assert type(trainer.model).__name__ == "PeftModel" and trainer.model.get_base_model() is model
        trainer.train()
        assert sc.stats(trainer.model) == sc.stats(model) and sc.stats(model)["calls"] == 2
    finally:
        stack.undo()


def test_trainer_full_finetuning_parity(tok):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    data = build_dataset(80, form="text").map(lambda r: tok(r["text"], truncation=True, max_length=64),
                                              remove_columns=["text"])

    def train(names):
        model = make_model(tok, layers=2)
        args = TrainingArguments(output_dir="/tmp/sft_sc_tr", use_cpu=True, report_to="none", max_steps=20,
                                 per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-3,
                                 save_strategy="no", seed=0, gradient_checkpointing=bool(names),
                                 dataloader_num_workers=0)
        with sft_plugins.compose(names) as stack:
            kwargs = stack.prepare(model=model, args=args, train_dataset=data,
                                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
            trainer = Trainer(**kwargs)
            trainer.train()
            calls = sc.stats(model)["calls"] if names else 0
        return logged_losses(trainer), calls, model

    (a, _, ma), (b, calls, mb) = train([]), train([NAME])
    assert calls == 40 and len(a) == 20 and a == pytest.approx(b, rel=1e-5)
    # the fused norm and MLP sum in another order: gradients equal to fp32 rounding, which Adam's m/sqrt(v)
    # scales up on entries whose gradient is near zero (a few embedding rows end ~1e-5 apart)
    for p, q in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-5)


def test_checkpointing_re_enabled_after_prepare_is_caught(tok):
    stack, trainer, _ = sft(tok, [NAME])
    try:
        trainer.model.get_base_model().gradient_checkpointing_enable()
        with pytest.raises(PluginError, match="replaced"):
            trainer.train()
    finally:
        stack.undo()


@needs_cuda
def test_gpu_sfttrainer_bf16_lora_runs(tok):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model = build_model("tiny", tokenizer=tok, num_hidden_layers=4)
    args = SFTConfig(output_dir="/tmp/sft_sc_gpu", bf16=True, report_to="none", max_steps=10,
                     per_device_train_batch_size=4, logging_steps=1, save_strategy="no", max_length=128)
    with sft_plugins.compose([NAME]) as stack:
        kwargs = stack.prepare(model=model, args=args, train_dataset=build_dataset(80), processing_class=tok,
                               peft_config=LoraConfig(r=4, target_modules="all-linear"))
        trainer = SFTTrainer(**kwargs)
        trainer.train()
        stats = sc.stats(model)  # the model given to prepare(); trainer.model is the PeftModel around it
    assert stats["calls"] == 40 and stats["offloaded_fraction"] == pytest.approx(3 / 4)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
