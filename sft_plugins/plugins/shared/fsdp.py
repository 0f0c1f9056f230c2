"""FSDP, read once for every plugin: whether the trainer will run under it, and whether FSDP2's
``fully_shard`` has been applied to a module or sharded a tensor (without importing torch.distributed)."""

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


def is_fsdp_module(module: Any) -> bool:
    """Whether FSDP2's ``fully_shard`` was applied to ``module``."""
    return unsharded_class(type(module)) is not type(module)


def unsharded_class(kind: type) -> type:
    """The module's own class under FSDP2: ``fully_shard`` swaps a module's class for a dynamic
    ``FSDP<Name>(FSDPModule, <Name>)`` subclass (e.g. ``FSDPLinear``); its parameters stay the module's
    own, sharded as DTensors between forwards. Any other subclass is returned unchanged (and refused
    where a plain class is needed)."""
    bases = kind.__bases__
    if len(bases) == 2 and bases[0].__name__ == "FSDPModule" and bases[0].__module__.startswith("torch.distributed"):
        return bases[1]
    return kind


def is_dtensor(t: Any) -> bool:
    """A DTensor (a sharded parameter, between FSDP2's forwards)."""
    return type(t).__name__ == "DTensor"
