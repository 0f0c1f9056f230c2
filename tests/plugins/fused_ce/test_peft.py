"""fused_ce under PEFT: LoRA models (given to prepare, or as SFTTrainer's peft_config), LoRA on lm_head
trained through the kernel (gradients equal to PEFT's own forward), a modules_to_save lm_head copy;
DoRA on lm_head and ``lm_head_lora="refuse"`` raise PluginError."""

from __future__ import annotations

import pytest
import torch

import sft_plugins
from sft_plugins import PluginError
from sft_plugins.embedded import build_model

from .helpers import TORCH, assert_forward_parity, assert_losses_close, tiny, train_sft, with_lora


def test_lora_model_sft_parity(tmp_path, tok, sft_ds):
    base = train_sft([], tmp_path, tok, sft_ds, model=with_lora(build_model(tokenizer=tok)), steps=6)[0]
    fused, calls, _, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, model=with_lora(build_model(tokenizer=tok)),
                                   options=TORCH, steps=6)
    assert calls == {"fused_lm_head": 6}
    assert_losses_close(base, fused)


def test_peft_config_given_to_sft_trainer(tmp_path, tok, sft_ds):
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    # with TRL's default gradient checkpointing (on), which recomputes the backbone under PEFT
    base = train_sft([], tmp_path, tok, sft_ds, peft_config=cfg, steps=6, gradient_checkpointing=True)[0]
    fused, calls, _, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, peft_config=cfg, options=TORCH, steps=6,
                                   gradient_checkpointing=True)
    assert calls == {"fused_lm_head": 6}
    assert_losses_close(base, fused)


def test_lora_on_lm_head_is_trained_exactly():
    model = with_lora(tiny("llama"), target_modules=["q_proj", "lm_head"])
    g = assert_forward_parity(model, options=TORCH)
    head = [n for n in g if "lm_head.lora_" in n]
    assert len(head) == 2 and all(g[n].abs().sum() > 0 for n in head)


def test_modules_to_save_lm_head_sft_parity(tmp_path, tok, sft_ds):
    # (TRL 1.16 itself refuses a LoRA adapter on lm_head in SFTTrainer; a trained copy is allowed)
    def make():
        return with_lora(build_model(tokenizer=tok), modules_to_save=["lm_head"])

    base = train_sft([], tmp_path, tok, sft_ds, model=make(), steps=4)[0]
    model = make()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lm_head.modules_to_save" in n}
    fused, calls, _, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, model=model, options=TORCH, steps=4)
    assert calls == {"fused_lm_head": 4}
    assert_losses_close(base, fused)
    after = dict(model.named_parameters())
    assert before and all(not torch.equal(before[n], after[n]) for n in before)


def test_modules_to_save_lm_head_is_trained_exactly():
    model = with_lora(tiny("llama"), modules_to_save=["lm_head"])
    g = assert_forward_parity(model, options=TORCH)
    assert any("lm_head.modules_to_save" in n for n in g)


def test_lm_head_refusals():
    dora = with_lora(tiny("llama"), target_modules=["q_proj", "lm_head"], use_dora=True)
    with pytest.raises(PluginError, match="DoRA|variant"):
        sft_plugins.compose(["fused_ce"]).prepare(model=dora)
    assert "forward" not in vars(dora.base_model.model)  # refused before anything was patched
    lora = with_lora(tiny("llama"), target_modules=["lm_head"])
    with pytest.raises(PluginError, match="lm_head_lora"):
        sft_plugins.compose(["fused_ce"], options={"fused_ce": {"lm_head_lora": "refuse"}}).prepare(model=lora)
