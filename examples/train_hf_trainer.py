"""Compose plugins into a plain transformers.Trainer (no TRL) on the embedded default.

    python examples/train_hf_trainer.py [plugin ...]
"""

import sys

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import sft_plugins
from sft_plugins.embedded import build_dataset, build_model, build_tokenizer

names = sys.argv[1:]
tokenizer = build_tokenizer()
model = build_model(tokenizer=tokenizer)
dataset = build_dataset(512, form="text").map(
    lambda ex: tokenizer(ex["text"] + tokenizer.eos_token, truncation=True, max_length=256), remove_columns=["text"])
args = TrainingArguments(
    output_dir="runs/example-hf", max_steps=30, per_device_train_batch_size=8, learning_rate=1e-3,
    logging_steps=5, save_strategy="no", report_to="none",
    bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
)
kwargs = dict(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)

with sft_plugins.compose(names) as stack:
    kwargs = stack.prepare(**kwargs)
    # Trainer has no default LM collator: use HF's unless a plugin supplied one.
    kwargs.setdefault("data_collator", DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer = Trainer(**kwargs)
    result = trainer.train()
print(f"plugins={names or ['baseline']} final train loss {result.training_loss:.4f}")
