"""fused_ce: the training loss goes through the fused kernel in SFTTrainer and Trainer, exactly.

What is held (fp32, CPU; the Triton kernel runs under TRITON_INTERPRET=1 from conftest, so the
20-step parity runs use tiny batches; other tests use the plugin's torch backend, the same math):

* SFTTrainer and Trainer: 20 steps baseline vs fused_ce, per-step loss within 1e-3 relative, TRL's
  entropy / mean_token_accuracy metrics close, and every step went through the kernel.
* gradient accumulation 4x1 == 1x4 (num_items_in_batch), LoRA (given to prepare or as peft_config),
  tied embeddings, Qwen2 / Mistral / Gemma-2 (softcap) / Granite (logit scale): loss and gradients of
  every trainable parameter equal to the model's own forward.
* lm_head adapters: LoRA on lm_head is trained (gradients equal to PEFT's own forward), modules_to_save
  lm_head too; DoRA on lm_head and lm_head_lora="refuse" raise PluginError.
* eval and generation unchanged; undo() leaves no patched attribute behind; refusals name the fix.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from typing import Any

import pytest

import sft_plugins
from sft_plugins import PluginError
from sft_plugins.embedded import build_dataset, build_model, build_tokenizer, records

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from sft_plugins.plugins import fused_ce  # noqa: E402

TORCH = {"fused_ce": {"backend": "torch"}}  # same math as the Triton kernel, no interpreter cost


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def sft_ds():
    return build_dataset(96, form="prompt_completion", max_words=8)


@pytest.fixture(scope="module")
def lm_ds(tok):
    from datasets import Dataset

    texts = [r["text"] for r in records(96, form="text", max_words=8)]
    return Dataset.from_dict(dict(tok(texts, truncation=True, max_length=32)))


@pytest.fixture(autouse=True)
def _nothing_left_behind():
    yield
    assert not fused_ce._PATCHES, "a test left a fused_ce patch behind"
    assert fused_ce._TRL_ORIGINAL is None
    import trl.trainer.sft_trainer as sft_mod
    import trl.trainer.utils as trl_utils

    assert sft_mod.add_fused_lm_head is trl_utils.add_fused_lm_head


class _Rec:
    """A TrainerCallback recording every logged training step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Rec(TrainerCallback):
            def __init__(self) -> None:
                self.logs: list[dict[str, float]] = []

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    self.logs.append(dict(logs))

        return Rec()


def _common(tmp_path, steps: int, bs: int, **overrides: Any) -> dict[str, Any]:
    base = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=bs, use_cpu=True,
                report_to="none", save_strategy="no", logging_steps=1, learning_rate=1e-3, seed=0,
                disable_tqdm=True, lr_scheduler_type="constant")
    return {**base, **overrides}


def train_sft(names, tmp_path, tok, ds, *, model=None, options=None, steps=20, bs=2, peft_config=None,
              evaluate=False, **overrides):
    from trl import SFTConfig, SFTTrainer

    model = model if model is not None else build_model(tokenizer=tok)
    args = SFTConfig(**_common(tmp_path, steps, bs, **{"bf16": False, "max_length": 32,
                                                        "gradient_checkpointing": False, **overrides}))
    stack = sft_plugins.compose(names, options=options)
    rec = _Rec()
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
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model = model if model is not None else build_model(tokenizer=tok)
    args = TrainingArguments(**_common(tmp_path, steps, bs, **overrides))
    stack = sft_plugins.compose(names, options=options)
    rec = _Rec()
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


# -- training parity through the Triton kernel (interpreter on CPU) ---------------------------------
@pytest.fixture
def backends_used(monkeypatch):
    """The kernel backends (row functions) that ran: proves which path was exercised."""
    from sft_plugins.kernels import _function

    used: list[str] = []
    original = _function._row_fn

    def spy(backend: str):
        used.append(backend)
        return original(backend)

    monkeypatch.setattr(_function, "_row_fn", spy)
    return used


def test_sft_trainer_parity_20_steps(tmp_path, tok, sft_ds, backends_used):
    base, none_calls, _, ev0 = train_sft([], tmp_path, tok, sft_ds, evaluate=True)
    assert not backends_used
    fused, calls, _, ev1 = train_sft(["fused_ce"], tmp_path, tok, sft_ds, evaluate=True)
    # the trainer runs on the CPU here (use_cpu=True), also on a GPU machine: Triton only under the interpreter
    expected = "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    assert backends_used and set(backends_used) == {expected}
    assert none_calls is None and calls == {"fused_lm_head": 20}  # every step went through the kernel
    assert_losses_close(base, fused)
    assert_losses_close(base, fused, key="entropy")
    for x, y in zip(base, fused):  # one top-1 flip on a near tie would move it by ~0.03
        assert abs(x["mean_token_accuracy"] - y["mean_token_accuracy"]) <= 0.05
    mean = lambda logs: sum(r["mean_token_accuracy"] for r in logs) / len(logs)  # noqa: E731
    assert abs(mean(base) - mean(fused)) <= 0.01
    # eval ran through TRL's own head (eval mode is left alone) on the fused-trained weights
    assert abs(ev0["eval_loss"] - ev1["eval_loss"]) <= 1e-3 * abs(ev0["eval_loss"])


def test_trainer_parity_20_steps(tmp_path, tok, lm_ds, backends_used):
    base, _ = train_hf([], tmp_path, tok, lm_ds)
    assert not backends_used
    fused, calls = train_hf(["fused_ce"], tmp_path, tok, lm_ds)
    assert len(backends_used) == 20
    assert calls == {"labels": 20}
    assert_losses_close(base, fused)


def test_sft_dft_loss_parity(tmp_path, tok, sft_ds):
    # TRL's DFT loss weights each token by its probability: per-token log_probs gradients must be exact
    base = train_sft([], tmp_path, tok, sft_ds, steps=4, loss_type="dft")[0]
    fused, calls, _, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, options=TORCH, steps=4, loss_type="dft")
    assert calls == {"fused_lm_head": 4}
    assert_losses_close(base, fused)


# -- gradient accumulation -------------------------------------------------------------------------
@pytest.mark.parametrize("trainer", ["sft", "hf"])
def test_grad_accumulation_4x1_equals_1x4(tmp_path, tok, sft_ds, lm_ds, trainer):
    if trainer == "sft":
        run = lambda **kw: train_sft(["fused_ce"], tmp_path, tok, sft_ds, options=TORCH, steps=5, **kw)[0]  # noqa: E731
    else:
        run = lambda **kw: train_hf(["fused_ce"], tmp_path, tok, lm_ds, options=TORCH, steps=5, **kw)[0]  # noqa: E731
    one_by_four = run(bs=4)
    four_by_one = run(bs=1, gradient_accumulation_steps=4)
    assert_losses_close(one_by_four, four_by_one)


# -- direct forward/backward parity against the model's own forward --------------------------------
def _batch(vocab: int, b: int = 2, t: int = 12, seed: int = 0) -> dict[str, Any]:
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
    vocab = fused_ce._lm_head.base_of(model).config.vocab_size
    batch = _batch(vocab)
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


def _tiny(model_type: str, **kw: Any):
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


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architectures_forward_parity(arch):
    # default backend: the Triton kernel (interpreter on CPU)
    assert_forward_parity(_tiny(arch, **ARCHS[arch]))


def test_shift_labels_as_hf():
    # context parallelism passes pre-shifted labels: scored without shifting, exactly as HF does
    model = _tiny("llama")
    ref = copy.deepcopy(model)
    batch = _batch(512)
    shift = batch["labels"].roll(3, dims=1)  # any labels: they must be scored position by position
    ref.train()
    want = ref(**batch, shift_labels=shift).loss
    with sft_plugins.compose(["fused_ce"], options=TORCH) as stack:
        stack.prepare(model=model)
        model.train()
        got = model(**batch, shift_labels=shift).loss
        plain = model(**batch).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert abs(float(plain.detach()) - float(got.detach())) > 1e-3  # the shift_labels path really differs


def test_num_items_in_batch_normalisation():
    assert_forward_parity(_tiny("llama"), options=TORCH, num_items=37)


def test_tied_embeddings_forward_parity_and_training(tmp_path, tok, lm_ds):
    model = build_model(tokenizer=tok, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    g = assert_forward_parity(model, options=TORCH)
    assert "model.embed_tokens.weight" in g  # one parameter, both uses' gradients
    base, _ = train_hf([], tmp_path, tok, lm_ds, model=build_model(tokenizer=tok, tie_word_embeddings=True),
                       steps=5)
    fused, _ = train_hf(["fused_ce"], tmp_path, tok, lm_ds, options=TORCH, steps=5,
                        model=build_model(tokenizer=tok, tie_word_embeddings=True))
    assert_losses_close(base, fused)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma2"])
def test_architectures_sft_training_parity(tmp_path, tok, sft_ds, arch):
    def make():
        return _tiny(arch, **ARCHS[arch])

    base = train_sft([], tmp_path, tok, sft_ds, model=make(), steps=5)[0]
    fused, calls, _, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, model=make(), options=TORCH, steps=5)
    assert calls == {"fused_lm_head": 5}
    assert_losses_close(base, fused)
    assert_losses_close(base, fused, key="entropy")


# -- PEFT ------------------------------------------------------------------------------------------
def _peft(model, **kw: Any):
    from peft import LoraConfig, get_peft_model

    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    cfg.update(kw)
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(**cfg))


def test_lora_model_sft_parity(tmp_path, tok, sft_ds):
    base = train_sft([], tmp_path, tok, sft_ds, model=_peft(build_model(tokenizer=tok)), steps=6)[0]
    fused, calls, trainer, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, model=_peft(build_model(tokenizer=tok)),
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


def test_trl_packing_padding_free_parity(tmp_path, tok, sft_ds):
    # TRL's BFD packing: one row per batch, restarting position_ids, no attention_mask
    base = train_sft([], tmp_path, tok, sft_ds, steps=4, packing=True, max_length=64)[0]
    fused, calls, _, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, options=TORCH, steps=4, packing=True,
                                   max_length=64)
    assert calls == {"fused_lm_head": 4}
    assert_losses_close(base, fused)


def test_lora_on_lm_head_is_trained_exactly():
    model = _peft(_tiny("llama"), target_modules=["q_proj", "lm_head"])
    g = assert_forward_parity(model, options=TORCH)
    head = [n for n in g if "lm_head.lora_" in n]
    assert len(head) == 2 and all(g[n].abs().sum() > 0 for n in head)


def test_modules_to_save_lm_head_sft_parity(tmp_path, tok, sft_ds):
    # (TRL 1.16 itself refuses a LoRA adapter on lm_head in SFTTrainer; a trained copy is allowed)
    def make():
        return _peft(build_model(tokenizer=tok), modules_to_save=["lm_head"])

    base = train_sft([], tmp_path, tok, sft_ds, model=make(), steps=4)[0]
    model = make()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lm_head.modules_to_save" in n}
    fused, calls, _, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, model=model, options=TORCH, steps=4)
    assert calls == {"fused_lm_head": 4}
    assert_losses_close(base, fused)
    after = dict(model.named_parameters())
    assert before and all(not torch.equal(before[n], after[n]) for n in before)


def test_modules_to_save_lm_head_is_trained_exactly():
    model = _peft(_tiny("llama"), modules_to_save=["lm_head"])
    g = assert_forward_parity(model, options=TORCH)
    assert any("lm_head.modules_to_save" in n for n in g)


def test_lm_head_refusals(tok):
    dora = _peft(_tiny("llama"), target_modules=["q_proj", "lm_head"], use_dora=True)
    with pytest.raises(PluginError, match="DoRA|variant"):
        sft_plugins.compose(["fused_ce"]).prepare(model=dora)
    lora = _peft(_tiny("llama"), target_modules=["lm_head"])
    with pytest.raises(PluginError, match="lm_head_lora"):
        sft_plugins.compose(["fused_ce"], options={"fused_ce": {"lm_head_lora": "refuse"}}).prepare(model=lora)


# -- eval, generation, undo ------------------------------------------------------------------------
def test_eval_and_generation_unchanged(tok):
    model = build_model(tokenizer=tok)
    ref = copy.deepcopy(model).eval()
    batch = _batch(model.config.vocab_size)
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
    assert getattr(model.__dict__["forward"], fused_ce._MARK, False)
    stack.undo()
    assert "forward" not in model.__dict__ and LlamaForCausalLM.__dict__["forward"] is cls_forward
    # With a trainer: after undo the model carries TRL's own head, exactly what SFTTrainer installs
    model = build_model(tokenizer=tok)
    _, _, trainer, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, model=model, options=TORCH, steps=2)
    current = model.__dict__["forward"]
    assert fused_ce.is_trl_head(current) and not hasattr(current, fused_ce._MARK)
    assert LlamaForCausalLM.__dict__["forward"] is cls_forward
    trainer.train()  # the trainer still works, now as the baseline would


def test_guard_takes_over_a_head_installed_past_the_interceptor(tmp_path, tok, sft_ds, monkeypatch):
    # SFTTrainer built while our interceptor is not in place (e.g. trl imported only after prepare):
    # TRL's head lands on top of ours; the callback takes over again at train begin
    import trl.trainer.sft_trainer as sft_mod
    import trl.trainer.utils as trl_utils
    from trl import SFTConfig, SFTTrainer

    model = build_model(tokenizer=tok)
    stack = sft_plugins.compose(["fused_ce"], options=TORCH)
    kwargs = stack.prepare(model=model, train_dataset=sft_ds, processing_class=tok,
                           args=SFTConfig(**_common(tmp_path, 2, 2, bf16=False, max_length=32,
                                                    gradient_checkpointing=False)))
    try:
        with monkeypatch.context() as m:
            m.setattr(sft_mod, "add_fused_lm_head", trl_utils.add_fused_lm_head)
            trainer = SFTTrainer(**kwargs)
        assert not getattr(model.__dict__["forward"], fused_ce._MARK, False)
        trainer.train()
        assert fused_ce.patch_of(model).calls == {"fused_lm_head": 2}
    finally:
        stack.undo()
    assert fused_ce.is_trl_head(model.__dict__["forward"])


def test_guard_refuses_a_foreign_forward(tmp_path, tok, lm_ds):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model = build_model(tokenizer=tok)
    stack = sft_plugins.compose(["fused_ce"], options=TORCH)
    kwargs = stack.prepare(model=model, args=TrainingArguments(**_common(tmp_path, 1, 2)), train_dataset=lm_ds,
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
def test_refusals(tmp_path, tok):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    model = build_model(tokenizer=tok)
    with pytest.raises(PluginError, match="label_smoothing_factor"):
        sft_plugins.compose(["fused_ce"]).prepare(
            model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, label_smoothing_factor=0.1))
    with pytest.raises(PluginError, match="unknown option"):
        sft_plugins.compose(["fused_ce"], options={"fused_ce": {"chunk": 3}}).prepare(model=model)
    with pytest.raises(PluginError, match="backend"):
        sft_plugins.compose(["fused_ce"], options={"fused_ce": {"backend": "cuda"}}).prepare(model=model)
    with pytest.raises(PluginError, match="model=<PreTrainedModel"):
        sft_plugins.compose(["fused_ce"]).prepare(model="meta-llama/Llama-3.2-1B")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128))
    with pytest.raises(PluginError, match="extra_model_types"):
        sft_plugins.compose(["fused_ce"]).prepare(model=gpt2)
    moe = _tiny("qwen2")
    moe.config.output_router_logits = True
    with pytest.raises(PluginError, match="output_router_logits"):
        sft_plugins.compose(["fused_ce"]).prepare(model=moe)
    with sft_plugins.compose(["fused_ce"]) as first:
        first.prepare(model=model)
        with pytest.raises(PluginError, match="already patched"):
            sft_plugins.compose(["fused_ce"]).prepare(model=model)
    assert "forward" not in model.__dict__


def test_describe():
    info = sft_plugins.compose(["fused_ce"]).describe()["fused_ce"]
    assert info["loss_parity"] == 1e-3 and info["summary"]


# -- GPU --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_sft_parity(tmp_path, tok, sft_ds):
    def make():
        return build_model(tokenizer=tok, dtype=torch.bfloat16)

    over = dict(use_cpu=False, bf16=True)
    base = train_sft([], tmp_path, tok, sft_ds, model=make(), steps=10, **over)[0]
    fused, calls, _, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, model=make(), steps=10, **over)
    assert calls == {"fused_lm_head": 10}
    assert_losses_close(base, fused, rel=2e-2)  # bf16: the two heads round differently


def test_mixed_precision_autocast_wrapper(tmp_path, tok, lm_ds, sft_ds):
    # bf16=True with fp32 weights: accelerate wraps the model's forward in autocast at train start
    # (on top of ours). The guard must see through it, the kernel must run under it, undo must not raise.
    base, _ = train_hf([], tmp_path, tok, lm_ds, steps=4, bf16=True)
    fused, calls = train_hf(["fused_ce"], tmp_path, tok, lm_ds, options=TORCH, steps=4, bf16=True)
    assert calls == {"labels": 4}
    assert_losses_close(base, fused, rel=2e-2)  # bf16 logits: the two heads round differently
    base = train_sft([], tmp_path, tok, sft_ds, steps=4, bf16=True)[0]
    fused, calls, trainer, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, options=TORCH, steps=4, bf16=True)
    assert calls == {"fused_lm_head": 4}
    assert_losses_close(base, fused, rel=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp32_trainer_parity_20_steps(tmp_path, tok, lm_ds, backends_used):
    base, _ = train_hf([], tmp_path, tok, lm_ds, use_cpu=False)
    fused, calls = train_hf(["fused_ce"], tmp_path, tok, lm_ds, use_cpu=False)
    assert calls == {"labels": 20} and set(backends_used) == {"triton"}
    assert_losses_close(base, fused)


@pytest.mark.parametrize("other", ["padding_free", "packing"])
def test_composes_with_padding_free_and_packing(tmp_path, tok, sft_ds, other):
    # one flattened row per batch (position_ids, no attention_mask): the kernel sees the same tokens
    base = train_sft([other], tmp_path, tok, sft_ds, steps=3, bs=4, max_length=64)[0]
    fused, calls, _, _ = train_sft([other, "fused_ce"], tmp_path, tok, sft_ds, options=TORCH, steps=3, bs=4,
                                   max_length=64)
    assert calls == {"fused_lm_head": 3}
    assert_losses_close(base, fused)
