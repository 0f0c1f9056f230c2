"""Helpers of the fused_ce tests: training loops (SFTTrainer, Trainer) returning per-step logs and the
kernel's call counts, and the direct forward/backward parity check against the model's own forward."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

import sft_plugins
from sft_plugins.embedded import build_model
from sft_plugins.plugins import fused_ce
from sft_plugins.plugins.fused_ce.lm_head import base_of

TORCH = {"fused_ce": {"backend": "torch"}}  # same math as the Triton kernel, no interpreter cost


def _recorder():
    """A TrainerCallback recording every logged training step (in ``.logs``)."""
    from transformers import TrainerCallback

    class Rec(TrainerCallback):
        def __init__(self) -> None:
            self.logs: list[dict[str, float]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

    return Rec()


def common_args(tmp_path, steps: int, bs: int, **overrides: Any) -> dict[str, Any]:
    base = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=bs, use_cpu=True,
                report_to="none", save_strategy="no", logging_steps=1, learning_rate=1e-3, seed=0,
                disable_tqdm=True, lr_scheduler_type="constant")
    return {**base, **overrides}


def train_sft(names, tmp_path, tok, ds, *, model=None, options=None, steps=20, bs=2, peft_config=None,
              evaluate=False, **overrides):
    """SFTTrainer run: ``(logs, kernel calls or None, trainer, eval metrics or None)``; the stack is undone."""
    from trl import SFTConfig, SFTTrainer

    model = model if model is not None else build_model(tokenizer=tok)
    args = SFTConfig(**common_args(tmp_path, steps, bs, **{"bf16": False, "max_length": 32,
                                                            "gradient_checkpointing": False, **overrides}))
    stack = sft_plugins.compose(names, options=options)
    rec = _recorder()
    extra = {"peft_config": peft_config} if peft_config is not None else {}
    kwargs = stack.prepare(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[rec],
                           eval_dataset=ds.select(range(8)) if evaluate else None, **extra)
    calls = None
    try:
        trainer = SFTTrainer(**kwargs)
        trainer.train()
        patch = fused_ce.patch_of(trainer.model)
        calls = dict(patch.calls) if patch else None
        ev = trainer.evaluate() if evaluate else None
    finally:
        stack.undo()
    return rec.logs, calls, trainer, ev


def train_hf(names, tmp_path, tok, ds, *, model=None, options=None, steps=20, bs=2, **overrides):
    """transformers.Trainer run (causal-LM collator): ``(logs, kernel calls or None)``; the stack is undone."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model = model if model is not None else build_model(tokenizer=tok)
    args = TrainingArguments(**common_args(tmp_path, steps, bs, **overrides))
    stack = sft_plugins.compose(names, options=options)
    rec = _recorder()
    kwargs = stack.prepare(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[rec],
                           data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    try:
        trainer = Trainer(**kwargs)
        trainer.train()
        patch = fused_ce.patch_of(trainer.model)
        calls = dict(patch.calls) if patch else None
    finally:
        stack.undo()
    return rec.logs, calls


def assert_losses_close(a, b, rel=1e-3, key="loss"):
    assert len(a) == len(b) and a, (len(a), len(b))
    for i, (x, y) in enumerate(zip(a, b)):
        assert math.isfinite(y[key]), (i, y)
        assert abs(x[key] - y[key]) <= rel * abs(x[key]) + 1e-6, (i, key, x[key], y[key])


def make_batch(vocab: int, b: int = 2, t: int = 12, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding in the second row
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # a "prompt"
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model) -> dict[str, Any]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_forward_parity(model, options=None, num_items=None, rtol=1e-4):
    """Loss and every trainable gradient of the patched model equal the unpatched model's."""
    ref = copy.deepcopy(model)
    vocab = base_of(model).config.vocab_size
    batch = make_batch(vocab)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref.train()
    out_ref = ref(**batch, **extra)
    out_ref.loss.backward()
    stack = sft_plugins.compose(["fused_ce"], options=options)
    stack.prepare(model=model)
    try:
        model.train()
        out = model(**batch, **extra)
        assert out.logits is None  # the logits were never built
        assert fused_ce.patch_of(model).calls["labels"] == 1
        out.loss.backward()
    finally:
        stack.undo()
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=rtol, atol=1e-6)
    g_ref, g = _grads(ref), _grads(model)
    assert g.keys() == g_ref.keys() and g
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-3, atol=1e-6, msg=name)
    return g


def tiny(model_type: str, **kw: Any):
    """A 2-layer model of ``model_type`` from its config (fp32, vocab 512)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    cfg.update(kw)
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **cfg)
    attn = "eager" if model_type == "gemma2" else "sdpa"
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


ARCHS = {
    "llama": {},
    "qwen2": {},
    "mistral": {},
    "gemma2": dict(head_dim=16, final_logit_softcapping=5.0, query_pre_attn_scalar=16),  # softcap that bites
    "granite": dict(logits_scaling=4.0),  # logits divided by 4
    "cohere": dict(logit_scale=0.5),
}


def with_lora(model, **kw: Any):
    from peft import LoraConfig, get_peft_model

    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    cfg.update(kw)
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(**cfg))
