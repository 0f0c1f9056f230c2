"""The ``adamw_8bit`` trainer callback (imports transformers; loaded only when a stack asks for it)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .optimizer import embedding_parameters, find_optimizer


class AdamW8bitEmbeddingsCallback(TrainerCallback):
    """Re-reads the embedding parameters from the trainer's own model at train begin.

    The model given to ``prepare`` may be a string, or be wrapped later (PEFT's
    ``modules_to_save`` copies embeddings into new parameters). The optimizer is built before
    ``on_train_begin`` but creates its state lazily at the first step, so adding ids here is in time.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        ours = find_optimizer(optimizer)
        if ours is not None:
            ours.add_fp32_params(embedding_parameters(model))
