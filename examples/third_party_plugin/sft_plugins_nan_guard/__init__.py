"""An example third-party plugin: stop training as soon as the logged loss is NaN or inf.

HF's Trainer hides NaN/inf losses from the logs by default (``logging_nan_inf_filter=True``), so the
plugin turns that filter off through ``sft_update_args`` and watches the logs with a callback.
"""

from __future__ import annotations

import math
from typing import Any

from sft_plugins import hookimpl


def _callback_class() -> type:
    from transformers import TrainerCallback

    class NanGuardCallback(TrainerCallback):
        """Stops training on the first non-finite logged loss."""

        def __init__(self) -> None:
            self.checked = 0
            self.tripped_at: int | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - HF signature
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            self.checked += 1
            if not math.isfinite(float(loss)):
                self.tripped_at = state.global_step
                control.should_training_stop = True

    return NanGuardCallback


@hookimpl
def sft_describe() -> dict[str, Any]:
    return {"summary": "stop training on a NaN/inf loss", "loss_parity": 0.0}


@hookimpl
def sft_update_args(args: Any) -> dict[str, Any]:
    return {"logging_nan_inf_filter": False}


@hookimpl
def sft_callbacks(args: Any) -> list[Any]:
    return [_callback_class()()]
