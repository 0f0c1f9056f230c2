"""Unsloth's canonical QLoRA recipe on an unmodified TRL SFTTrainer, with the plugins composed explicitly:
a 4-bit (NF4, double-quant) base, LoRA r16 on all linear layers, 8-bit AdamW, batch 2 x grad-accum 4,
lr 2e-4, sequences up to 2,048 tokens, a chat dataset of ``messages``.

    python examples/qlora_sft.py                                  # meta-llama/Llama-3.2-1B-Instruct (hub)
    python examples/qlora_sft.py --model ./my-local-model --data my_chats.jsonl
    python examples/qlora_sft.py --plugins fused_ce,adamw_8bit    # an ablation arm: any subset, your order
    python examples/qlora_sft.py --model tiny --max-steps 2       # the embedded tiny model (a CPU is enough)

The same run as a ``trl sft`` config: ``sft-plugins train --config examples/qlora_sft.yaml``.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

import sft_plugins

HERE = pathlib.Path(__file__).resolve().parent
PLUGINS = "fused_ce,smart_checkpointing,padding_free,adamw_8bit"


def load_4bit(model: str, dtype: torch.dtype) -> tuple[AutoModelForCausalLM, AutoTokenizer]:
    """The base model as QLoRA loads it: bitsandbytes NF4 with double quantisation, compute in ``dtype``."""
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    device_map = {"": 0} if torch.cuda.is_available() else None
    if model != "tiny":
        return (AutoModelForCausalLM.from_pretrained(model, quantization_config=quantization, dtype=dtype,
                                                     device_map=device_map),
                AutoTokenizer.from_pretrained(model))
    # the embedded tiny Llama: bitsandbytes quantises while loading, so it goes through a folder like any model
    from sft_plugins.embedded import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        build_model(tokenizer=tokenizer).save_pretrained(folder)
        return (AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=dtype,
                                                     device_map=device_map), tokenizer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="meta-llama/Llama-3.2-1B-Instruct",
                    help="hub id or local folder of the base model; 'tiny': the embedded model")
    ap.add_argument("--data", default=str(HERE / "data" / "chat.jsonl"), help="a .jsonl of chat `messages`")
    ap.add_argument("--plugins", default=PLUGINS, help="comma list, composed in this order ('' for none)")
    ap.add_argument("--max-steps", type=int, default=60, help="optimizer steps")
    ap.add_argument("--output-dir", default="qlora-output", help="where the adapter and tokenizer are saved")
    a = ap.parse_args()

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32  # bitsandbytes computes 4-bit layers in fp32 on a CPU
    model, tokenizer = load_4bit(a.model, dtype)
    args = SFTConfig(
        output_dir=a.output_dir, max_steps=a.max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=4,
        learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=5, max_length=2048, logging_steps=1,
        optim="adamw_8bit", seed=3407, report_to="none", save_strategy="no", bf16=cuda, use_cpu=not cuda,
    )
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    names = [n for n in a.plugins.split(",") if n]
    with sft_plugins.compose(names) as stack:  # leaving the block undoes every patch
        kwargs = stack.prepare(model=model, args=args, processing_class=tokenizer, peft_config=lora,
                               train_dataset=load_dataset("json", data_files=a.data, split="train"))
        trainer = SFTTrainer(**kwargs)
        result = trainer.train()
        trainer.save_model(a.output_dir)  # the LoRA adapter (and the tokenizer)
    print(f"plugins={names or ['baseline']} final train loss {result.training_loss:.4f}; adapter in {a.output_dir}")


if __name__ == "__main__":
    main()
