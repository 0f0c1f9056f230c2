"""The packing plugin's trainer callback (imports transformers; loaded only when a stack asks for it)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .rows import PackedRows


class RepackEachEpoch(TrainerCallback):
    """Repack before each epoch's dataloader iterator is made (on_epoch_begin runs first).

    The epoch is the integer part of ``state.epoch``: 0, 1, ... at each epoch's start, and on a resume the
    epoch the run stopped in (1.56 -> 1), so the rest of that epoch is drawn from the same packing."""

    def __init__(self, rows: PackedRows) -> None:
        self.rows = rows

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rows.set_epoch(int((state.epoch or 0) + 1e-6))  # 1e-6: epoch e ends at e + n/n
