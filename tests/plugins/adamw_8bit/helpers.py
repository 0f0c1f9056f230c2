"""Helpers of the adamw_8bit tests: SFT arguments, a loss recorder, a training run with a stack, and the
plugin's options as its hooks get them (for calling a hook directly)."""

from __future__ import annotations

from typing import Any

import sft_plugins
from sft_plugins.embedded import build_model


def options(**given: Any) -> dict[str, Any]:
    """adamw_8bit's options with the schema's defaults filled in, exactly as compose() hands them to hooks."""
    return sft_plugins.compose(["adamw_8bit"], options={"adamw_8bit": given}).options["adamw_8bit"]


def sft_args(tmp_path, **overrides: Any):
    from trl import SFTConfig

    base = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, bf16=False, use_cpu=True,
                report_to="none", save_strategy="no", logging_steps=1, max_length=64, learning_rate=2e-3,
                weight_decay=0.01, seed=0, gradient_checkpointing=False, disable_tqdm=True,
                lr_scheduler_type="constant")
    return SFTConfig(**{**base, **overrides})


def loss_recorder():
    """A callback that collects the per-step training losses the Trainer logs."""
    from transformers import TrainerCallback

    class LossRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.losses: dict[int, float] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    return LossRecorder()


def train(names, tmp_path, tok, dataset, *, options=None, resume=None, model=None, **overrides):
    """SFTTrainer run with a stack of ``names`` (undone after): ``(losses by step, trainer)``."""
    from trl import SFTTrainer

    model = model if model is not None else build_model(tokenizer=tok)
    stack = sft_plugins.compose(names, options=options)
    rec = loss_recorder()
    kwargs = stack.prepare(model=model, args=sft_args(tmp_path, **overrides), train_dataset=dataset,
                           processing_class=tok, callbacks=[rec])
    try:
        trainer = SFTTrainer(**kwargs)
        trainer.train(resume_from_checkpoint=resume)
    finally:
        stack.undo()
    return rec.losses, trainer
