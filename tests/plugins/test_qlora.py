"""Every plugin on a bitsandbytes-quantised (QLoRA) base: 4-bit NF4 with double quantisation and FP4 without,
and 8-bit LLM.int8(); LoRA through SFTTrainer's ``peft_config`` or a model the user wrapped with peft. The parity
plugins train the baseline's losses; where a plugin re-implements a layer (the lean MLP recompute, the fused
LM head) it really ran on the quantised weights. On the CPU (bitsandbytes' CPU backend, fp32 compute) and, on a
GPU, in bf16 with the memory it saves."""

from __future__ import annotations

import pytest
import torch

import sft_plugins
import sft_plugins.plugins.smart_checkpointing
from sft_plugins import PluginError
from sft_plugins.plugins.smart_checkpointing import lean_mlp

from .smart_checkpointing.helpers import gpu_backward_peaks

pytestmark = pytest.mark.usefixtures("one_thread")
bnb = pytest.importorskip("bitsandbytes")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
ALL = ["fused_ce", "smart_checkpointing", "padding_free", "packing", "adamw_8bit", "fused_lora"]


@pytest.fixture(scope="module")
def model_dir(local_model_and_chat):
    return local_model_and_chat[0]


def _load(model_dir, quant, device="cpu", skip_lm_head=True, dtype=None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    skip = None if skip_lm_head else []
    if quant == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        quant_type, double_quant = quant.split("-") if "-" in quant else (quant, "")
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=dtype,
                                    bnb_4bit_use_double_quant=double_quant == "dq", llm_int8_skip_modules=skip)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=dtype,
                                                     device_map={"": 0} if device == "cuda" else None)
    except Exception as exc:  # a bitsandbytes build without this backend
        pytest.skip(f"bitsandbytes cannot load {quant} on {device}: {exc}")
    kind = "Linear8bitLt" if quant == "8bit" else "Linear4bit"
    assert any(type(m).__name__ == kind for m in model.modules())
    return model


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")


def _losses(model_dir, tok, names, quant, tmp_path, *, options=None, device="cpu", user_peft=False,
            skip_lm_head=True, steps=4):
    """Per-step losses of SFTTrainer on the quantised model with ``names`` composed; asserts that the fused
    kernel and our checkpoint (with the lean MLP on 4-bit projections) ran on every step."""
    from trl import SFTConfig, SFTTrainer

    from sft_plugins.embedded import build_dataset

    model = _load(model_dir, quant, device, skip_lm_head)
    kwargs = {"peft_config": _lora()}
    if user_peft:  # the user wrapped the model with peft before handing it over
        from peft import get_peft_model

        torch.manual_seed(0)  # the LoRA init draws from the RNG (SFTTrainer seeds before wrapping with peft_config)
        model, kwargs = get_peft_model(model, _lora()), {}
    cuda = device == "cuda"
    args = SFTConfig(output_dir=str(tmp_path / "_".join(names or ["base"])), max_steps=steps,
                     per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                     report_to="none", use_cpu=not cuda, bf16=cuda, max_length=96, seed=0, disable_tqdm=True)
    lean_calls = []
    apply = lean_mlp._LeanSwiGLU.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lean_mlp._LeanSwiGLU, "apply", lambda *a: (lean_calls.append(1), apply(*a))[1])
        stack = sft_plugins.compose(names, options=options)
        with stack:
            trainer = SFTTrainer(**stack.prepare(model=model, args=args, processing_class=tok,
                                                 train_dataset=build_dataset(32, max_words=16), **kwargs))
            trainer.train()
            if "fused_ce" in names:  # the loss went through the kernel, not a fallback
                assert sum(stack.state_of("fused_ce").patch.calls.values()) == steps
            if "fused_lora" in names:  # every LoRA projection fused, but over 8-bit bases (PEFT's forward there)
                from sft_plugins.plugins.fused_lora import patched_layers

                assert patched_layers(stack.state_of("fused_lora")) == 2 * 7
            if "smart_checkpointing" in names:  # every layer of every step went through our checkpoint
                assert sft_plugins.plugins.smart_checkpointing.stats(trainer.model)["calls"] == steps * 2
                # the lean MLP ran on the 4-bit projections in each layer's first forward and recompute; 8-bit
                # ones run through bitsandbytes
                lean = (options or {}).get("smart_checkpointing", {}).get("lean_mlp", "auto") is not False
                assert len(lean_calls) == (steps * 2 * 2 if lean and quant != "8bit" else 0)
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


def _parity(name):
    return sft_plugins.available()[name].loss_parity


@pytest.mark.parametrize("quant", ["nf4-dq", "fp4", "8bit"])
@pytest.mark.parametrize("name", ["fused_ce", "smart_checkpointing", "padding_free", "fused_lora"])
def test_parity_plugin_on_a_quantized_base(model_dir, tok, tmp_path, quant, name):
    base = _losses(model_dir, tok, [], quant, tmp_path)
    ours = _losses(model_dir, tok, [name], quant, tmp_path)
    assert len(base) == 4 and ours == pytest.approx(base, rel=_parity(name))


@pytest.mark.parametrize("quant", ["nf4-dq", "8bit"])
def test_all_plugins_on_a_quantized_base(model_dir, tok, tmp_path, quant):
    losses = _losses(model_dir, tok, ALL, quant, tmp_path)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


def test_user_wrapped_peft_model(model_dir, tok, tmp_path):
    """A model the user wrapped with ``get_peft_model`` themselves: same losses as through ``peft_config``."""
    base = _losses(model_dir, tok, [], "nf4-dq", tmp_path, user_peft=True)
    for name in ("fused_ce", "smart_checkpointing"):
        assert _losses(model_dir, tok, [name], "nf4-dq", tmp_path, user_peft=True) == pytest.approx(
            base, rel=_parity(name))
    assert all(torch.isfinite(torch.tensor(_losses(model_dir, tok, ALL, "nf4-dq", tmp_path, user_peft=True))))


def _trainer_losses(model_dir, tok, names, tmp_path):
    """transformers' Trainer on a model whose head is quantised too (TRL's own fused head cannot multiply by a
    packed 4-bit weight, so SFTTrainer's baseline would fail there)."""
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from sft_plugins.embedded import build_token_dataset

    model = _load(model_dir, "nf4-dq", skip_lm_head=False)
    assert type(model.lm_head).__name__ == "Linear4bit"
    torch.manual_seed(0)
    model = get_peft_model(model, _lora())
    args = TrainingArguments(output_dir=str(tmp_path / "_".join(names or ["base"])), max_steps=4, logging_steps=1,
                             per_device_train_batch_size=4, learning_rate=1e-3, save_strategy="no", report_to="none",
                             use_cpu=True, seed=0, disable_tqdm=True, remove_unused_columns=False)
    with sft_plugins.compose(names) as stack:
        trainer = Trainer(**stack.prepare(model=model, args=args, train_dataset=build_token_dataset(16, max_length=64),
                                          data_collator=DataCollatorForLanguageModeling(tok, mlm=False)))
        trainer.train()
        if names:
            assert sum(stack.state_of("fused_ce").patch.calls.values()) == 4
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


def test_fused_ce_on_a_4bit_lm_head(model_dir, tok, tmp_path):
    """A head quantised too (llm_int8_skip_modules=[]): fused_ce dequantises it with bitsandbytes, same losses."""
    base = _trainer_losses(model_dir, tok, [], tmp_path)
    assert len(base) == 4 and _trainer_losses(model_dir, tok, ["fused_ce"], tmp_path) == pytest.approx(
        base, rel=_parity("fused_ce"))


def test_fused_ce_refuses_an_8bit_lm_head(model_dir, tok, tmp_path):
    with pytest.raises(PluginError, match="8-bit LLM.int8"):
        _losses(model_dir, tok, ["fused_ce"], "8bit", tmp_path, skip_lm_head=False, steps=1)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_lean_mlp_on_lora_over_4bit_projections(quant_type):
    """The fused SwiGLU function on LoRA-wrapped Linear4bit projections: the module's own output and gradients
    (input and every LoRA factor), the base weights dequantised by bitsandbytes."""
    from peft import LoraConfig, get_peft_model
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=128))
    for name in ("gate_proj", "up_proj", "down_proj"):
        dense = getattr(mlp, name)
        layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=torch.float32,
                                  quant_type=quant_type)
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type=quant_type)
        setattr(mlp, name, layer.to("cpu"))
    holder = torch.nn.Module()
    holder.mlp = mlp
    config = LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
    mlp = get_peft_model(holder, config).base_model.model.mlp
    lean = lean_mlp.make_lean_forward(mlp)
    assert lean is not None
    x = torch.randn(2, 7, 64, requires_grad=True)
    results = []
    for forward in (mlp.forward, lean):
        x.grad = None
        mlp.zero_grad()
        y = forward(x)
        y.square().sum().backward()
        results.append((y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in mlp.named_parameters()
                                                      if p.grad is not None}))
    (y0, dx0, g0), (y1, dx1, g1) = results
    assert len(g0) == 6 and g0.keys() == g1.keys()
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx1, dx0, rtol=1e-4, atol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5)


def test_lean_mlp_true_on_an_8bit_base_names_the_fix(model_dir):
    from peft import get_peft_model

    model = get_peft_model(_load(model_dir, "8bit"), _lora())
    with pytest.raises(PluginError, match="lean_mlp=False"):
        sft_plugins.compose(["smart_checkpointing"], options={"smart_checkpointing": {"lean_mlp": True}}).prepare(
            model=model)


# -- on the GPU: bf16 compute, the recipe's optimizer ----------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("name", ["fused_ce", "smart_checkpointing", "padding_free", "fused_lora"])
def test_gpu_parity_plugin_on_a_4bit_base(model_dir, tok, tmp_path, name):
    base = _losses(model_dir, tok, [], "nf4-dq", tmp_path, device="cuda", steps=6)
    ours = _losses(model_dir, tok, [name], "nf4-dq", tmp_path, device="cuda", steps=6)
    # bf16: the promise is for fp32; on the GPU the curves stay within bf16 noise
    assert ours == pytest.approx(base, rel=2e-2)


@needs_cuda
@pytest.mark.parametrize("quant", ["nf4-dq", "fp4", "8bit"])
def test_gpu_all_plugins_on_a_quantized_base(model_dir, tok, tmp_path, quant):
    base = _losses(model_dir, tok, [], quant, tmp_path, device="cuda", steps=6)
    ours = _losses(model_dir, tok, ALL, quant, tmp_path, device="cuda", steps=6)
    assert all(torch.isfinite(torch.tensor(ours))) and abs(ours[-1] - base[-1]) < 0.5


@needs_cuda
def test_gpu_lean_mlp_on_4bit_saves_memory_and_keeps_the_loss(tok, tmp_path):
    """LoRA over 4-bit projections, 4096 tokens: the lean MLP recompute's backward peak is below bitsandbytes' own
    MLP in the same recompute by several [tokens, intermediate] tensors, at the same losses (bf16 rounding)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from sft_plugins.embedded import build_model

    tokens, inter, hidden = 4096, 4096, 256
    build_model("tiny", tokenizer=tok, num_hidden_layers=2, intermediate_size=inter, hidden_size=hidden,
                dtype=torch.bfloat16).save_pretrained(tmp_path / "dense")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    results = {}
    for lean in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16, device_map={"": 0},
                                                     quantization_config=quant)
        options = {"lean_mlp": lean, "lean_norm": False, "mlp_chunks": 0}
        results[lean] = gpu_backward_peaks(get_peft_model(model, _lora()), tok, options, tokens, autocast=True)
    (plain_losses, plain_peak), (lean_losses, lean_peak) = results[False], results[True]
    unit = tokens * inter * 2  # one bf16 [tokens, intermediate] tensor
    print(f"4-bit MLP recompute, backward peak: bitsandbytes {plain_peak / unit:.2f}, lean {lean_peak / unit:.2f} "
          f"[tokens, intermediate] tensors; losses {plain_losses} vs {lean_losses}")
    for a, b in zip(plain_losses, lean_losses):
        assert abs(a - b) <= 2e-2 * abs(a)
    assert plain_peak - lean_peak >= 3 * unit, (plain_peak / unit, lean_peak / unit)


def test_frozen_fp32_embeddings_downcast_with_the_same_losses(model_dir, tok, tmp_path):
    """peft's prepare_model_for_kbit_training leaves the frozen embedding tables (input and head) in fp32; under
    bf16 training fused_ce stores them in bf16 again at train begin: half their bytes, bit-identical losses, and
    undo() gives the fp32 tables back."""
    from peft import prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    from sft_plugins.embedded import build_dataset

    def run(downcast):
        torch.manual_seed(0)
        model = prepare_model_for_kbit_training(_load(model_dir, "nf4-dq", dtype=torch.bfloat16),
                                                use_gradient_checkpointing=False)
        table = model.get_input_embeddings().weight
        assert table.dtype == torch.float32 and not table.requires_grad
        args = SFTConfig(output_dir=str(tmp_path / f"dc{downcast}"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                         bf16=True, max_length=64, seed=0, disable_tqdm=True)
        stack = sft_plugins.compose(["fused_ce"], options={"fused_ce": {"downcast_frozen_embeddings": downcast}})
        with stack:
            trainer = SFTTrainer(**stack.prepare(model=model, args=args, processing_class=tok, peft_config=_lora(),
                                                 train_dataset=build_dataset(24, max_words=12)))
            trainer.train()
            dtype = table.dtype
            saved = getattr(getattr(stack.state_of("fused_ce"), "downcast", None), "saved_bytes", 0)
        assert table.dtype == torch.float32  # undone
        return [r["loss"] for r in trainer.state.log_history if "loss" in r], dtype, saved

    kept, kept_dtype, _ = run(False)
    down, down_dtype, saved = run(True)
    assert kept_dtype == torch.float32 and down_dtype == torch.bfloat16
    model = _load(model_dir, "nf4-dq", dtype=torch.bfloat16)
    tables = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())}
    assert saved == 2 * sum(tables.values())  # each fp32 table (tied or not) stored in 2 bytes less per value
    assert down == kept
