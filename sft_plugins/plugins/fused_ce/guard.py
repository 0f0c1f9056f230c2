"""The ``fused_ce`` trainer callback (imports transformers; loaded only when a stack asks for it)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .patch import Patch, ensure_taken_over


class FusedCEGuard(TrainerCallback):
    """Checks at train begin that the loss path is ours (reinstalling over TRL's head if needed)."""

    def __init__(self, patch: Patch) -> None:
        self.patch = patch

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            ensure_taken_over(self.patch, model)
