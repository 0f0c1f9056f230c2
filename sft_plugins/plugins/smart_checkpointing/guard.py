"""The ``smart_checkpointing`` trainer callback (imports transformers; loaded only when a stack asks for it)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..._errors import PluginError
from .patch import NAME, Patch


class SmartCheckpointingGuard(TrainerCallback):
    """Fails loudly if something replaced our checkpointing after prepare() (a silent no-op otherwise); at train
    begin, also gives ``lean_lora_cast`` to the LoRA layers the trainer added after prepare()."""

    def __init__(self, patch: Patch) -> None:
        self.patch = patch

    def _check(self, args: Any, model: Any) -> None:
        flag = getattr(args, "activation_checkpointing", getattr(args, "gradient_checkpointing", False))
        if flag:
            raise PluginError(f"args.gradient_checkpointing was turned back on after {NAME} prepared them; "
                              "the trainer would replace our checkpointing: leave it False")
        if self.patch.active and not self.patch.intact():
            raise PluginError(f"{NAME}'s checkpointing function was replaced on the model (by "
                              "gradient_checkpointing_enable() or another plugin) after prepare(): "
                              "don't enable checkpointing yourself, or drop " + NAME)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check(args, kwargs.get("model"))
        self.patch.install_lora_casts()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check(args, kwargs.get("model"))
