"""The packing plugin's trainer callback (imports transformers; loaded only when a stack asks for it)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .rows import PackedRows


class RepackEachEpoch(TrainerCallback):
    """Repack before each epoch's dataloader iterator is made (on_epoch_begin runs first)."""

    def __init__(self, rows: PackedRows) -> None:
        self.rows = rows

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rows.set_epoch(round(state.epoch or 0))
