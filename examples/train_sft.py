"""Compose plugins into an unmodified TRL SFTTrainer on the embedded default (tiny model, generated data).

    python examples/train_sft.py                       # baseline
    python examples/train_sft.py padding_free fused_ce # any plugins, in your order
"""

import sys

import torch
from trl import SFTConfig, SFTTrainer

import sft_plugins
from sft_plugins.embedded import build_dataset, build_model, build_tokenizer

names = sys.argv[1:]
tokenizer = build_tokenizer()
model = build_model(tokenizer=tokenizer)
args = SFTConfig(
    output_dir="runs/example-sft", max_steps=30, per_device_train_batch_size=8, learning_rate=1e-3,
    max_length=256, logging_steps=5, save_strategy="no", report_to="none",
    bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
)

with sft_plugins.compose(names) as stack:  # leaving the block undoes every patch
    kwargs = stack.prepare(model=model, args=args, train_dataset=build_dataset(512), processing_class=tokenizer)
    trainer = SFTTrainer(**kwargs)
    result = trainer.train()
print(f"plugins={names or ['baseline']} final train loss {result.training_loss:.4f}")
