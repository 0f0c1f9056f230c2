"""fused_ce's patch: eval and generation unchanged, undo leaves nothing behind (on the model and in TRL),
TRL's ``add_fused_lm_head`` interception shared by patches, the train-begin guard, and the refusals,
each naming the fix."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch

import sft_plugins
from sft_plugins import PluginError
from sft_plugins.embedded import build_model
from sft_plugins.plugins import fused_ce
from sft_plugins.plugins.fused_ce.patch import _MARK, _PATCH_ATTR, TrlHeadInterceptor, is_trl_head, patch_of_base

from .helpers import TORCH, common_args, make_batch, tiny, train_sft


def test_eval_and_generation_unchanged(tok):
    model = build_model(tokenizer=tok)
    ref = copy.deepcopy(model).eval()
    batch = make_batch(model.config.vocab_size)
    with sft_plugins.compose(["fused_ce"]) as stack:
        stack.prepare(model=model)
        model.eval()
        with torch.no_grad():
            out, out_ref = model(**batch), ref(**batch)
        assert out.logits is not None  # eval forward is the model's own
        torch.testing.assert_close(out.logits, out_ref.logits, rtol=0, atol=0)
        torch.testing.assert_close(out.loss, out_ref.loss, rtol=0, atol=0)
        prompt = batch["input_ids"][:1, :5]
        gen = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        gen_ref = ref.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert torch.equal(gen, gen_ref)
        model.train()  # training mode without labels (no loss asked for): still the model's own forward
        with torch.no_grad():
            assert model(input_ids=prompt).logits is not None
        assert fused_ce.patch_of(model).calls == {}


def test_undo_leaves_nothing_behind(tmp_path, tok, sft_ds):
    from transformers import LlamaForCausalLM

    cls_forward = LlamaForCausalLM.__dict__["forward"]
    model = build_model(tokenizer=tok)
    stack = sft_plugins.compose(["fused_ce"])
    stack.prepare(model=model)
    patch = fused_ce.patch_of(model)
    assert getattr(model.__dict__["forward"], _MARK, False)
    assert vars(model)[_PATCH_ATTR] is patch is stack.state_of("fused_ce").patch and patch.active
    stack.undo()
    assert "forward" not in model.__dict__ and LlamaForCausalLM.__dict__["forward"] is cls_forward
    assert _PATCH_ATTR not in vars(model) and fused_ce.patch_of(model) is None and not patch.active
    # With a trainer: after undo the model carries TRL's own head, exactly what SFTTrainer installs
    model = build_model(tokenizer=tok)
    _, _, trainer, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, model=model, options=TORCH, steps=2)
    current = model.__dict__["forward"]
    assert is_trl_head(current) and not hasattr(current, _MARK)
    assert _PATCH_ATTR not in vars(model)
    assert LlamaForCausalLM.__dict__["forward"] is cls_forward
    trainer.train()  # the trainer still works, now as the baseline would


def test_trl_interceptor_is_shared_and_given_back_by_the_last_undo(tok):
    """While any model is patched, SFTTrainer's add_fused_lm_head is one interceptor holding TRL's function
    and its user count; it serves unpatched models with TRL's head, and the last undo puts TRL's back."""
    import trl.trainer.sft_trainer as sft_mod
    import trl.trainer.utils as trl_utils

    a, b, other = build_model(tokenizer=tok), build_model(tokenizer=tok), build_model(tokenizer=tok)
    first, second = sft_plugins.compose(["fused_ce"]), sft_plugins.compose(["fused_ce"])
    first.prepare(model=a)
    try:
        interceptor = sft_mod.add_fused_lm_head
        assert isinstance(interceptor, TrlHeadInterceptor) and interceptor.original is trl_utils.add_fused_lm_head
        assert interceptor.users == 1
        second.prepare(model=b)
        assert sft_mod.add_fused_lm_head is interceptor and interceptor.users == 2
        assert patch_of_base(a) is not patch_of_base(b)
        interceptor(other)  # a model no stack patched gets TRL's own head
        assert is_trl_head(vars(other)["forward"]) and patch_of_base(other) is None
        first.undo()
        assert sft_mod.add_fused_lm_head is interceptor and interceptor.users == 1
        assert fused_ce.patch_of(a) is None and fused_ce.patch_of(b) is not None
    finally:
        first.undo()
        second.undo()
    assert interceptor.users == 0 and sft_mod.add_fused_lm_head is trl_utils.add_fused_lm_head
    assert fused_ce.patch_of(b) is None and "forward" not in vars(b)


def test_guard_takes_over_a_head_installed_past_the_interceptor(tmp_path, tok, sft_ds, monkeypatch):
    # SFTTrainer built while our interceptor is not in place (e.g. trl imported only after prepare):
    # TRL's head lands on top of ours; the callback takes over again at train begin
    import trl.trainer.sft_trainer as sft_mod
    import trl.trainer.utils as trl_utils
    from trl import SFTConfig, SFTTrainer

    model = build_model(tokenizer=tok)
    stack = sft_plugins.compose(["fused_ce"], options=TORCH)
    kwargs = stack.prepare(model=model, train_dataset=sft_ds, processing_class=tok,
                           args=SFTConfig(**common_args(tmp_path, 2, 2, bf16=False, max_length=32,
                                                        gradient_checkpointing=False)))
    try:
        with monkeypatch.context() as m:
            m.setattr(sft_mod, "add_fused_lm_head", trl_utils.add_fused_lm_head)
            trainer = SFTTrainer(**kwargs)
        assert not getattr(model.__dict__["forward"], _MARK, False)
        trainer.train()
        assert fused_ce.patch_of(model).calls == {"fused_lm_head": 2}
    finally:
        stack.undo()
    assert is_trl_head(model.__dict__["forward"])


def test_guard_refuses_a_foreign_forward(tmp_path, tok, lm_ds):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model = build_model(tokenizer=tok)
    stack = sft_plugins.compose(["fused_ce"], options=TORCH)
    kwargs = stack.prepare(model=model, args=TrainingArguments(**common_args(tmp_path, 1, 2)), train_dataset=lm_ds,
                           data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    ours = model.__dict__["forward"]

    @functools.wraps(type(model).forward)
    def foreign(*a: Any, **k: Any) -> Any:  # someone else's patch on top of ours
        return ours(*a, **k)

    model.forward = foreign
    try:
        with pytest.raises(PluginError, match="replaced"):
            Trainer(**kwargs).train()
    finally:
        model.forward = ours
        stack.undo()


# -- refusals ------------------------------------------------------------------------------------------
def test_bad_options_fail_at_compose():
    with pytest.raises(PluginError, match="bad options for fused_ce:(.|\n)*unknown option 'chunk'"):
        sft_plugins.compose(["fused_ce"], options={"fused_ce": {"chunk": 3}})
    with pytest.raises(PluginError, match="option 'backend' must be .*'torch', got 'cuda'"):
        sft_plugins.compose(["fused_ce"], options={"fused_ce": {"backend": "cuda"}})
    with pytest.raises(PluginError, match="extra_model_types"):
        sft_plugins.compose(["fused_ce"], options={"fused_ce": {"extra_model_types": ["gpt2", 3]}})


def test_refusals(tmp_path, tok):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    model = build_model(tokenizer=tok)
    with pytest.raises(PluginError, match="label_smoothing_factor"):
        sft_plugins.compose(["fused_ce"]).prepare(
            model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, label_smoothing_factor=0.1))
    with pytest.raises(PluginError, match="model=<PreTrainedModel"):
        sft_plugins.compose(["fused_ce"]).prepare(model="meta-llama/Llama-3.2-1B")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128))
    with pytest.raises(PluginError, match="extra_model_types"):
        sft_plugins.compose(["fused_ce"]).prepare(model=gpt2)
    moe = tiny("qwen2")
    moe.config.output_router_logits = True
    with pytest.raises(PluginError, match="output_router_logits"):
        sft_plugins.compose(["fused_ce"]).prepare(model=moe)
    with sft_plugins.compose(["fused_ce"]) as first:
        first.prepare(model=model)
        with pytest.raises(PluginError, match="already patched"):
            sft_plugins.compose(["fused_ce"]).prepare(model=model)
        assert fused_ce.patch_of(model) is first.state_of("fused_ce").patch  # the refused stack touched nothing
    assert "forward" not in model.__dict__ and _PATCH_ATTR not in vars(model)


def test_describe():
    info = sft_plugins.compose(["fused_ce"]).describe()["fused_ce"]
    assert info["loss_parity"] == 1e-3 and info["summary"]
