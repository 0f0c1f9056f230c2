"""What ``smart_checkpointing`` does to a model: our checkpoint function on every checkpointed layer, the
lean/tiled MLP and lean norms in the recompute, and how to put every attribute back.

The patch of a model is kept on the model instance (removed by undo), so two stacks in one process
never see each other's patches.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..shared import quantization_of

NAME = "smart_checkpointing"
logger = logging.getLogger("sft_plugins")
_PATCH_ATTR = "_sft_plugins_smart_checkpointing_patch"  # on the model instance while it is patched
_MISSING = object()
# HF/TRL gradient_checkpointing_kwargs we can honour: use_reentrant (ours has its own, exact, mechanics),
# preserve_rng_state and every_n_layers (mapped to our options), offload=True (what we do anyway).
MERGEABLE_KWARGS = {"use_reentrant", "preserve_rng_state", "every_n_layers", "offload"}


def checkpointing_kwargs(args: Any) -> dict[str, Any]:
    if args is None:
        return {}
    for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        value = getattr(args, name, None)
        if value:
            return dict(value)
    return {}


def checkpoint_layers(model: Any) -> list[Any]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def is_standard_func(fn: Any) -> bool:
    """torch's checkpoint as transformers installs it (plain, partial, or its offload wrapper)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    module = getattr(fn, "__module__", "") or ""
    return module.startswith(("torch.utils.checkpoint", "transformers."))


def mlp_of(layer: Any) -> Any:
    """The layer's dense, token-wise MLP (``layer.mlp`` of a *MLP class), or None (MoE blocks and others)."""
    import torch

    mlp = getattr(layer, "mlp", None)
    return mlp if isinstance(mlp, torch.nn.Module) and type(mlp).__name__.endswith("MLP") else None


@dataclass(eq=False)
class Patch:
    """What one sft_patch_model did, to undo it and to check it is still in place."""

    offloader: Any
    layers: list[Any]
    funcs: dict[int, Callable[..., Any]] = field(default_factory=dict)
    saved: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    active: bool = True  # False once undone: the guard then has nothing to check
    plans: list[Any] = field(default_factory=list)  # per checkpointed layer, in order (checkpoint.LayerPlan)
    budget: Any = None  # budget.BudgetState when a memory_budget other than "tight" is set
    lean_lora_cast: bool = False  # the option: our input cast on the layers' PEFT LoRA layers
    lora_casts: set[int] = field(default_factory=set)  # ids of the LoRA layers given it

    def intact(self) -> bool:
        return all(layer.__dict__.get("_gradient_checkpointing_func") is self.funcs[id(layer)]
                   for layer in self.layers if id(layer) in self.funcs)

    def install_lora_casts(self) -> int:
        """Our ``_cast_input_dtype`` (lora_cast.py) on the checkpointed layers' PEFT LoRA layers that do not have
        it yet; returns how many got it. Runs at prepare() and again when training begins, since
        ``SFTTrainer(peft_config=...)`` adds the LoRA layers after prepare()."""
        from .lora_cast import lora_cast_modules, make_lean_cast

        if not (self.active and self.lean_lora_cast):
            return 0
        added = 0
        for layer in self.layers:
            for module in lora_cast_modules(layer):
                if id(module) in self.lora_casts:
                    continue
                self.saved.append((module, {"_cast_input_dtype": module.__dict__.get("_cast_input_dtype", _MISSING)}))
                module._cast_input_dtype = make_lean_cast(module)
                self.lora_casts.add(id(module))
                added += 1
        return added


def patch_of(model: Any) -> Patch | None:
    """The live patch of ``model`` or of a model inside it (a PEFT wrapper holds the patched base), or None."""
    modules = model.modules() if hasattr(model, "modules") else [model]
    for module in modules:
        patch = getattr(module, "__dict__", {}).get(_PATCH_ATTR)
        if patch is not None:
            return patch
    return None


def _offloader(opts: dict[str, Any]) -> Any:
    import torch

    from .offload import GiB, OffloadConfig, Offloader, default_budget, default_reserve

    mode = {"auto": "offload", "always": "copy", "never": "keep"}[opts["offload"]]
    if opts["offload"] == "auto" and not torch.cuda.is_available():
        mode = "keep"
        warnings.warn(f"{NAME}: no CUDA device, so layer inputs are not offloaded: this is plain "
                      "activation checkpointing", RuntimeWarning, stacklevel=4)
    host, pageable, reserve = opts["host_budget_gb"], opts["pageable_budget_gb"], opts["host_reserve_gb"]
    config = OffloadConfig(
        mode=mode,
        host_budget=int(host * GiB) if host is not None else default_budget(),
        overflow=opts["overflow"],
        pageable_budget=int(pageable * GiB) if pageable is not None else default_budget(),
        host_reserve=int(reserve * GiB) if reserve is not None else default_reserve(),
        prefetch=opts["prefetch"],
        preserve_rng_state=opts["preserve_rng_state"],
    )
    return Offloader(config)


def apply_patch(model: Any, args: Any, opts: dict[str, Any]) -> tuple[Patch, Callable[[], None]]:
    """Patch ``model`` with the plugin's options; returns the patch and its undo."""
    patch = _apply(model, args, opts)
    vars(model)[_PATCH_ATTR] = patch

    def undo() -> None:
        _restore(patch)
        if vars(model).get(_PATCH_ATTR) is patch:
            del vars(model)[_PATCH_ATTR]

    return patch, undo


def _apply(model: Any, args: Any, opts: dict[str, Any]) -> Patch:
    from torch.utils.checkpoint import checkpoint as torch_checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    from .checkpoint import LayerPlan, make_checkpoint_fn
    from .lean_mlp import make_lean_forward as lean_mlp_forward
    from .lean_norm import layer_norms
    from .lean_norm import make_lean_forward as lean_norm_forward
    from .offload import GiB
    from .tiled_mlp import make_tiled_forward

    kwargs = checkpointing_kwargs(args)
    opts = dict(opts)
    for key in ("preserve_rng_state", "every_n_layers"):  # HF kwargs the user set win over our defaults
        if key in kwargs:
            opts[key] = kwargs[key]
    if kwargs:
        logger.info("%s: merged gradient_checkpointing_kwargs %s (use_reentrant has no effect here)", NAME, kwargs)
    offloader = _offloader(opts)
    layers = checkpoint_layers(model)
    every = opts["every_n_layers"]
    checkpointed = [layer for i, layer in enumerate(layers) if i % every == 0]
    keep_from = len(checkpointed) - opts["keep_last_on_gpu"]
    patch = Patch(offloader, checkpointed, lean_lora_cast=opts["lean_lora_cast"])
    if opts["memory_budget"] != "tight":
        from .budget import BudgetState

        patch.budget = BudgetState(opts["memory_budget"])
    plain = functools.partial(torch_checkpoint, use_reentrant=False,
                              preserve_rng_state=opts["preserve_rng_state"])
    slots = {id(layer): i for i, layer in enumerate(checkpointed)}
    int8_mlps = 0
    for module in model.modules():
        if not hasattr(module, "gradient_checkpointing"):
            continue
        patch.saved.append((module, {k: module.__dict__.get(k, _MISSING)
                                     for k in ("gradient_checkpointing", "_gradient_checkpointing_func")}))
        if isinstance(module, GradientCheckpointingLayer):
            slot = slots.get(id(module))
            if slot is None:  # every_n_layers skips it
                module.gradient_checkpointing = False
                continue
            plan = LayerPlan(offloader, slot, keep=slot >= keep_from, layer=module)
            patch.plans.append(plan)
            fn = make_checkpoint_fn(module, plan)
            patch.funcs[id(module)] = fn
            mlp = mlp_of(module) if opts["mlp_chunks"] or opts["lean_mlp"] else None
            if mlp is not None:
                patch.saved.append((mlp, {"forward": mlp.__dict__.get("forward", _MISSING)}))
                lean = lean_mlp_forward(mlp) if opts["lean_mlp"] else None
                if lean is not None:
                    mlp.forward = plan.lean_mlp = lean
                elif opts["lean_mlp"] and any(quantization_of(m) == "8bit" for m in mlp.modules()):
                    int8_mlps += 1
                if opts["mlp_chunks"]:  # tiles whichever forward is in place (the lean one included)
                    mlp.forward = make_tiled_forward(mlp, opts["mlp_chunks"])
            for norm in layer_norms(module) if opts["lean_norm"] else ():
                patch.saved.append((norm, {"forward": norm.__dict__.get("forward", _MISSING)}))
                norm.forward = lean_norm_forward(norm)
        else:
            # A non-layer module with the flag (e.g. LlamaModel): set it as HF does, so its use_cache
            # handling matches; if an older-style model checkpoints from there, it gets torch's checkpoint.
            fn = plain
        module.gradient_checkpointing = True
        module._gradient_checkpointing_func = fn
    if int8_mlps:
        logger.warning("%s: lean_mlp left %d MLPs with 8-bit (LLM.int8()) projections to bitsandbytes' own "
                       "forward in the recompute: int8 activation quantisation has no exact dense equivalent",
                       NAME, int8_mlps)
    patch.install_lora_casts()  # a model the user wrapped with PEFT already; the trainer's callback does the rest
    n_keep = min(opts["keep_last_on_gpu"], len(checkpointed))
    cfg = offloader.config
    logger.info("%s: %d of %d layers checkpointed, mode=%s, last %d kept on the GPU, host budget %.1f GiB, "
                "overflow=%s", NAME, len(checkpointed), len(layers), cfg.mode, n_keep,
                cfg.host_budget / GiB, cfg.overflow)
    return patch


def _restore(patch: Patch) -> None:
    for module, values in reversed(patch.saved):
        for key, value in values.items():
            if value is _MISSING:
                module.__dict__.pop(key, None)
            else:
                module.__dict__[key] = value
    patch.offloader.close()
    patch.active = False


