"""The parity plugins on a 4-bit (QLoRA) base, on the CPU: bitsandbytes quantises the embedded model (NF4 with
double quantisation, FP4 without), TRL's SFTTrainer adds LoRA through ``peft_config``, and each plugin trains the
same losses as the baseline; all four CPU-capable plugins together train too."""

from __future__ import annotations

import pytest
import torch

import sft_plugins
import sft_plugins.plugins.smart_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")
bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def model_dir(local_model_and_chat):
    return local_model_and_chat[0]


def _load_4bit(model_dir, quant_type, double_quant):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.float32,
                                bnb_4bit_use_double_quant=double_quant)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=torch.float32)
    except Exception as exc:  # a bitsandbytes build without CPU 4-bit support
        pytest.skip(f"bitsandbytes cannot load 4-bit on this CPU: {exc}")
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    return model


def _losses(model_dir, tok, names, quant_type, double_quant, tmp_path, options=None):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from sft_plugins.embedded import build_dataset

    model = _load_4bit(model_dir, quant_type, double_quant)
    args = SFTConfig(output_dir=str(tmp_path / "_".join(names or ["base"])), max_steps=4, per_device_train_batch_size=4,
                     learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                     bf16=False, max_length=96, seed=0, disable_tqdm=True)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    stack = sft_plugins.compose(names, options=options)
    with stack:
        trainer = SFTTrainer(**stack.prepare(model=model, args=args, processing_class=tok, peft_config=lora,
                                             train_dataset=build_dataset(32, max_words=16)))
        trainer.train()
        if "fused_ce" in names:  # the loss went through the kernel, not a fallback
            assert sum(stack.state_of("fused_ce").patch.calls.values()) == 4
        if "smart_checkpointing" in names:  # every layer of every step went through our checkpoint
            assert sft_plugins.plugins.smart_checkpointing.stats(trainer.model)["calls"] == 4 * 2
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("name", ["fused_ce", "smart_checkpointing", "padding_free"])
def test_parity_plugin_on_a_4bit_base(model_dir, tok, tmp_path, quant_type, double_quant, name):
    base = _losses(model_dir, tok, [], quant_type, double_quant, tmp_path)
    ours = _losses(model_dir, tok, [name], quant_type, double_quant, tmp_path)
    assert len(base) == 4 and ours == pytest.approx(base, rel=sft_plugins.available()[name].loss_parity)


def test_all_together_on_a_4bit_base(model_dir, tok, tmp_path):
    losses = _losses(model_dir, tok, ["fused_ce", "smart_checkpointing", "padding_free", "packing", "adamw_8bit"],
                     "nf4", True, tmp_path)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
