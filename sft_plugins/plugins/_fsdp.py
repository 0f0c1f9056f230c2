"""Whether the trainer will run under FSDP: one reading for every plugin that must refuse it."""

from __future__ import annotations

from typing import Any


def fsdp_requested(args: Any) -> str | None:
    """``"args"`` when ``args.fsdp`` asks for FSDP, ``"env"`` when only the environment does
    (``accelerate launch --use_fsdp`` or an accelerate config with FSDP sets ``ACCELERATE_USE_FSDP``,
    read here the way the trainer's Accelerator reads it), else None."""
    fsdp = getattr(args, "fsdp", None) if args is not None else None
    if fsdp and fsdp not in ("", []):
        return "args"
    from accelerate.utils import parse_flag_from_env

    return "env" if parse_flag_from_env("ACCELERATE_USE_FSDP") else None
