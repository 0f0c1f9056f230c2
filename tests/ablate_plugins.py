"""Test-only plugins for tests/test_ablate.py, loaded into the ablation's child processes with
``--load NAME=ablate_plugins:Class`` (the runner puts the parent's sys.path on the child's PYTHONPATH).

No torch at import time: the parent resolves them without importing torch.
"""

from __future__ import annotations

import os
from typing import Any

from sft_plugins import hookimpl


class LrBoost:
    """Promises loss parity 1e-3 but trains with 10x the learning rate: the verdict must be a fail."""

    @hookimpl
    def sft_describe(self) -> dict[str, Any]:
        return {"summary": "test: 10x learning rate, falsely promising parity", "loss_parity": 1e-3}

    @hookimpl
    def sft_update_args(self, args: Any) -> dict[str, Any]:
        return {"learning_rate": args.learning_rate * 10}


class Noop:
    """Changes nothing and promises exact parity (up to 1e-6): the verdict must be a pass."""

    @hookimpl
    def sft_describe(self) -> dict[str, Any]:
        return {"summary": "test: changes nothing", "loss_parity": 1e-6}

    @hookimpl
    def sft_callbacks(self) -> list[Any]:
        return []


def _crash_callback(hard: bool) -> Any:
    from transformers import TrainerCallback

    class CrashAtStep2(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:
                if hard:  # no Python cleanup at all: the child dies without writing its result
                    os._exit(17)
                raise RuntimeError("deliberate crash at step 2")

    return CrashAtStep2()


class Crash:
    """Raises in a callback at step 2: reported as failed, with the steps done and the message."""

    @hookimpl
    def sft_callbacks(self) -> list[Any]:
        return [_crash_callback(hard=False)]


class HardCrash:
    """Kills its own process at step 2 (os._exit(17)): reported as failed from the exit code and log."""

    @hookimpl
    def sft_callbacks(self) -> list[Any]:
        return [_crash_callback(hard=True)]


class _Collator:
    @hookimpl
    def sft_data_collator(self, processing_class: Any) -> Any:
        from transformers import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(processing_class, mlm=False)


class CollatorA(_Collator):
    """With CollatorB in one arm, two plugins supply the data collator: compose refuses."""


class CollatorB(_Collator):
    pass
