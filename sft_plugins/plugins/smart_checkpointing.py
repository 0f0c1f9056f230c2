"""smart_checkpointing: checkpoint every decoder layer and keep its input in host memory.

How it plugs in. transformers checkpoints a ``GradientCheckpointingLayer`` by calling that layer's
``_gradient_checkpointing_func`` when its ``gradient_checkpointing`` flag is set; ``Trainer`` sets both
(through ``gradient_checkpointing_enable``) when ``args.gradient_checkpointing`` is True, which TRL
makes the default. We set the flag and our own per-layer function on each layer, and set
``gradient_checkpointing=False`` in the args so the trainer does not replace our function with
torch's. This keeps transformers' own handling of ``use_cache`` and the KV cache under checkpointing,
works on transformers 5.17 and 5.24 alike, and is undone by restoring two attributes per module.

The function (``_offload.py``) recomputes the layer in backward like torch's checkpoint, but the
layer's input lives on the host in between (side stream, pinned buffers reused every step, copied
back one layer ahead). Exactness: the same ops run in the recompute, with the RNG and autocast state
of the forward, so losses and gradients equal those without checkpointing; the lean recompute
(``lean_mlp``, ``lean_norm``) runs the SwiGLU MLP and the RMSNorms as fused functions with the same
math, equal up to summation order. Under FSDP2 the recompute accumulates into the unsharded parameters
FSDP swaps in, and FSDP reduce-scatters them.

torch and transformers are imported inside functions only: listing plugins stays cheap.
"""

from __future__ import annotations

import functools
import logging
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from .._errors import PluginError
from .._markers import hookimpl
from ._fsdp import fsdp_requested

NAME = "smart_checkpointing"
logger = logging.getLogger("sft_plugins")

DEFAULT_OPTIONS: dict[str, Any] = {
    "offload": "auto",           # "auto": offload CUDA inputs; "never": plain checkpointing; "always": also
                                 # copy CPU inputs through the host pool (exercises the machinery without a GPU)
    "host_budget_gb": None,      # pinned host buffers; None: min(25% of RAM, 50% available now) / local ranks
    "overflow": "gpu",           # past the budget: "gpu" keeps inputs on the GPU; "pageable" uses pageable RAM
    "pageable_budget_gb": None,  # with overflow="pageable"; None: same rule as host_budget_gb
    "host_reserve_gb": None,     # never allocate below this much available RAM; None: max(2 GiB, 5% of RAM)
    "keep_last_on_gpu": 1,       # the last k checkpointed layers keep their input on the GPU (needed first)
    "prefetch": 1,               # how many layers ahead backward copies inputs back (0: on demand, leanest)
    "preserve_rng_state": True,  # replay dropout exactly in the recompute (as torch's checkpoint does)
    "every_n_layers": 1,         # checkpoint one layer in n (HF's every_n_layers)
    "mlp_chunks": "auto",        # >0: in the recompute, run each layer's MLP in this many sequence chunks, each
                                 # recomputed in backward (less GPU memory, one more MLP forward per layer);
                                 # "auto": only when GPU memory is short for the MLP (CUDA); 0: never
    "lean_mlp": "auto",          # in the recompute, a SwiGLU MLP (plain or LoRA projections) through a fused
                                 # function keeping 2.25 [tokens, intermediate] tensors at its peak instead of
                                 # ~8; "auto": where the MLP qualifies, True: refuse a model where none does
    "lean_norm": "auto",         # in the recompute, Llama-style RMSNorms through a fused function keeping no
                                 # fp32 copy of their input (2x a bf16 input, twice per layer); same values
}
_OFFLOAD_MODES = {"auto", "never", "always"}
# HF/TRL gradient_checkpointing_kwargs we can honour: use_reentrant (ours has its own, exact, mechanics),
# preserve_rng_state and every_n_layers (mapped to our options), offload=True (what we do anyway).
_MERGEABLE_KWARGS = {"use_reentrant", "preserve_rng_state", "every_n_layers", "offload"}
_WARNED_NO_CUDA = False


def _options(options: dict[str, Any] | None) -> dict[str, Any]:
    return {**DEFAULT_OPTIONS, **(options or {})}


def _number_ok(value: Any, *, integer: bool = False, minimum: float = 0.0, allow_none: bool = False) -> bool:
    if value is None:
        return allow_none
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if integer and not isinstance(value, int):
        return False
    return value >= minimum


def _option_errors(options: dict[str, Any]) -> list[str]:
    errors = []
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        errors.append(f"unknown option(s) {unknown}; {NAME} takes {sorted(DEFAULT_OPTIONS)}")
    opts = _options(options)
    if opts["offload"] not in _OFFLOAD_MODES:
        errors.append(f"option 'offload' must be one of {sorted(_OFFLOAD_MODES)}, got {opts['offload']!r}")
    if opts["overflow"] not in ("gpu", "pageable"):
        errors.append(f"option 'overflow' must be 'gpu' or 'pageable', got {opts['overflow']!r}")
    for key in ("host_budget_gb", "pageable_budget_gb", "host_reserve_gb"):
        if not _number_ok(opts[key], allow_none=True):
            errors.append(f"option {key!r} must be a number of GiB >= 0 or None, got {opts[key]!r}")
    for key, low in (("keep_last_on_gpu", 0), ("prefetch", 0), ("every_n_layers", 1), ("mlp_chunks", 0)):
        if key == "mlp_chunks" and opts[key] == "auto":
            continue
        if not _number_ok(opts[key], integer=True, minimum=low):
            errors.append(f"option {key!r} must be an integer >= {low}{' or auto' if key == 'mlp_chunks' else ''}, "
                          f"got {opts[key]!r}")
    for key in ("lean_mlp", "lean_norm"):
        if not (isinstance(opts[key], bool) or opts[key] == "auto"):
            errors.append(f"option {key!r} must be true, false or \"auto\", got {opts[key]!r}")
    if not isinstance(opts["preserve_rng_state"], bool):
        errors.append(f"option 'preserve_rng_state' must be true or false, got {opts['preserve_rng_state']!r}")
    return errors


def _ckpt_kwargs(args: Any) -> dict[str, Any]:
    if args is None:
        return {}
    for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        value = getattr(args, name, None)
        if value:
            return dict(value)
    return {}


def _args_errors(args: Any) -> list[str]:
    if args is None:
        return []
    errors = []
    if getattr(args, "activation_offloading", False):
        errors.append("TRL's activation_offloading=True offloads every saved tensor through its own hooks and "
                      "would fight ours over the checkpointed inputs: set activation_offloading=False "
                      f"({NAME} offloads them), or drop {NAME}")
    kwargs = _ckpt_kwargs(args)
    if kwargs.get("selective"):
        errors.append("gradient_checkpointing_kwargs={'selective': True} (TRL's selective checkpointing) saves "
                      f"tensors inside each layer, which {NAME} recomputes: drop 'selective' or drop {NAME}")
    if "offload" in kwargs and not kwargs["offload"]:
        errors.append(f"gradient_checkpointing_kwargs asks for offload=False but {NAME} offloads: drop the "
                      f"'offload' key, or pass options={{'{NAME}': {{'offload': 'never'}}}}")
    other = sorted(set(kwargs) - _MERGEABLE_KWARGS - {"selective"})
    if other:
        errors.append(f"gradient_checkpointing_kwargs {other} have no equivalent in {NAME} (it merges "
                      f"{sorted(_MERGEABLE_KWARGS)}): drop them or drop {NAME}")
    if getattr(args, "deepspeed", None):
        errors.append(f"{NAME} is not supported with DeepSpeed (ZeRO partitions the layer parameters it "
                      "recomputes with): use DeepSpeed's activation checkpointing instead")
    fsdp_config = getattr(args, "fsdp_config", None) or {}
    from accelerate.utils import parse_flag_from_env

    if fsdp_requested(args) and (fsdp_config.get("activation_checkpointing")
                                 or fsdp_config.get("fsdp_activation_checkpointing")
                                 or parse_flag_from_env("FSDP_ACTIVATION_CHECKPOINTING")):
        errors.append(f"fsdp_config asks for FSDP's own activation checkpointing, and {NAME} checkpoints the "
                      f"layers itself: drop one of them")
    return errors


def _ckpt_layers(model: Any) -> list[Any]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _is_standard_func(fn: Any) -> bool:
    """torch's checkpoint as transformers installs it (plain, partial, or its offload wrapper)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    module = getattr(fn, "__module__", "") or ""
    return module.startswith(("torch.utils.checkpoint", "transformers."))


def _mlp_of(layer: Any) -> Any:
    """The layer's dense, token-wise MLP (``layer.mlp`` of a *MLP class), or None (MoE blocks and others)."""
    import torch

    mlp = getattr(layer, "mlp", None)
    return mlp if isinstance(mlp, torch.nn.Module) and type(mlp).__name__.endswith("MLP") else None


def _model_errors(model: Any, options: dict[str, Any] | None = None) -> list[str]:
    if model is None or isinstance(model, str):
        return [] if model is None else [f"{NAME} patches the model: pass a model instance, not {model!r}"]
    layers = _ckpt_layers(model)
    if not layers:
        return [f"{type(model).__name__} has no transformers GradientCheckpointingLayer modules, so {NAME} "
                "cannot checkpoint its layers: use args.gradient_checkpointing=True instead"]
    custom = {type(fn).__name__ if not callable(fn) else getattr(fn, "__qualname__", repr(fn))
              for m in model.modules() if (fn := m.__dict__.get("_gradient_checkpointing_func")) is not None
              and not _is_standard_func(fn)}
    if custom:
        return [f"the model's layers already carry a custom checkpointing function ({sorted(custom)}): another "
                f"plugin or library patched checkpointing; undo it first or drop {NAME}"]
    opts = _options(options)
    chunks = opts["mlp_chunks"]
    if chunks != "auto" and chunks and any(_mlp_of(layer) is None for layer in layers):
        return [f"option mlp_chunks needs a dense MLP at layer.mlp in every layer (token-wise, e.g. LlamaMLP); "
                f"{type(layers[0]).__name__} has {type(getattr(layers[0], 'mlp', None)).__name__}: set mlp_chunks=0"]
    if opts["lean_mlp"] is True:  # "auto" uses it where it applies, silently
        from ._lean_mlp import _plan

        if not any((mlp := _mlp_of(layer)) is not None and _plan(mlp) is not None for layer in layers):
            return ["option lean_mlp needs SwiGLU MLPs (gate_proj, up_proj, down_proj, SiLU; plain or vanilla-LoRA "
                    f"projections without dropout); {type(getattr(layers[0], 'mlp', None)).__name__} is not one: "
                    "set lean_mlp=False"]
    if opts["lean_norm"] is True:
        from ._lean_norm import layer_norms

        if not any(layer_norms(layer) for layer in layers):
            return [f"option lean_norm needs Llama-style RMSNorms in the layers (transformers' LlamaRMSNorm code); "
                    f"{type(layers[0]).__name__} has none: set lean_norm=False"]
    return []


@dataclass(eq=False)  # identity: _ACTIVE.remove() must drop this patch, not an equal-looking one
class _Patch:
    """What one sft_patch_model did, to undo it and to check it is still in place."""

    offloader: Any
    layers: list[Any]
    funcs: dict[int, Callable[..., Any]] = field(default_factory=dict)
    saved: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)

    def intact(self) -> bool:
        return all(layer.__dict__.get("_gradient_checkpointing_func") is self.funcs[id(layer)]
                   for layer in self.layers if id(layer) in self.funcs)


_ACTIVE: list[_Patch] = []
_MISSING = object()


def stats(model: Any) -> dict[str, Any]:
    """The offloader's counters for a model patched by this plugin (bytes offloaded, kept, fallen back)."""
    modules = {id(m) for m in model.modules()}
    for patch in _ACTIVE:
        if patch.layers and id(patch.layers[0]) in modules:
            return patch.offloader.stats()
    raise PluginError(f"{type(model).__name__} is not patched by {NAME}")


def _offloader(opts: dict[str, Any]) -> Any:
    global _WARNED_NO_CUDA
    import torch

    from . import _offload

    mode = {"auto": "offload", "always": "copy", "never": "keep"}[opts["offload"]]
    if opts["offload"] == "auto" and not torch.cuda.is_available():
        mode = "keep"
        if not _WARNED_NO_CUDA:
            _WARNED_NO_CUDA = True
            warnings.warn(f"{NAME}: no CUDA device, so layer inputs are not offloaded: this is plain "
                          "activation checkpointing", RuntimeWarning, stacklevel=4)
    gb = _offload.GiB
    host = opts["host_budget_gb"]
    pageable = opts["pageable_budget_gb"]
    reserve = opts["host_reserve_gb"]
    config = _offload.OffloadConfig(
        mode=mode,
        host_budget=int(host * gb) if host is not None else _offload.default_budget(),
        overflow=opts["overflow"],
        pageable_budget=int(pageable * gb) if pageable is not None else _offload.default_budget(),
        host_reserve=int(reserve * gb) if reserve is not None else _offload.default_reserve(),
        prefetch=opts["prefetch"],
        preserve_rng_state=opts["preserve_rng_state"],
    )
    return _offload.Offloader(config)


def _apply(model: Any, args: Any, opts: dict[str, Any]) -> _Patch:
    from transformers.modeling_layers import GradientCheckpointingLayer

    from . import _lean_mlp, _lean_norm, _offload

    kwargs = _ckpt_kwargs(args)
    opts = dict(opts)
    for key in ("preserve_rng_state", "every_n_layers"):  # HF kwargs the user set win over our defaults
        if key in kwargs:
            opts[key] = kwargs[key]
    if kwargs:
        logger.info("%s: merged gradient_checkpointing_kwargs %s (use_reentrant has no effect here)", NAME, kwargs)
    offloader = _offloader(opts)
    layers = _ckpt_layers(model)
    every = opts["every_n_layers"]
    checkpointed = [layer for i, layer in enumerate(layers) if i % every == 0]
    keep_from = len(checkpointed) - opts["keep_last_on_gpu"]
    patch = _Patch(offloader, checkpointed)
    plain = functools.partial(_offload.torch_checkpoint, use_reentrant=False,
                              preserve_rng_state=opts["preserve_rng_state"])
    slots = {id(layer): i for i, layer in enumerate(checkpointed)}
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
            plan = _offload.LayerPlan(offloader, slot, keep=slot >= keep_from)
            fn = _offload.make_checkpoint_fn(module, plan)
            patch.funcs[id(module)] = fn
            mlp = _mlp_of(module) if opts["mlp_chunks"] or opts["lean_mlp"] else None
            if mlp is not None:
                patch.saved.append((mlp, {"forward": mlp.__dict__.get("forward", _MISSING)}))
                lean = _lean_mlp.make_lean_forward(mlp) if opts["lean_mlp"] else None
                if lean is not None:
                    mlp.forward = lean
                if opts["mlp_chunks"]:  # tiles whichever forward is in place (the lean one included)
                    mlp.forward = _offload.make_tiled_forward(mlp, opts["mlp_chunks"])
            for norm in _lean_norm.layer_norms(module) if opts["lean_norm"] else ():
                patch.saved.append((norm, {"forward": norm.__dict__.get("forward", _MISSING)}))
                norm.forward = _lean_norm.make_lean_forward(norm)
        else:
            # A non-layer module with the flag (e.g. LlamaModel): set it as HF does, so its use_cache
            # handling matches; if an older-style model checkpoints from there, it gets torch's checkpoint.
            fn = plain
        module.gradient_checkpointing = True
        module._gradient_checkpointing_func = fn
    n_keep = min(opts["keep_last_on_gpu"], len(checkpointed))
    cfg = offloader.config
    logger.info("%s: %d of %d layers checkpointed, mode=%s, last %d kept on the GPU, host budget %.1f GiB, "
                "overflow=%s", NAME, len(checkpointed), len(layers), cfg.mode, n_keep,
                cfg.host_budget / _offload.GiB, cfg.overflow)
    return patch


def _restore(patch: _Patch) -> None:
    for module, values in reversed(patch.saved):
        for key, value in values.items():
            if value is _MISSING:
                module.__dict__.pop(key, None)
            else:
                module.__dict__[key] = value
    patch.offloader.close()
    if patch in _ACTIVE:
        _ACTIVE.remove(patch)


# -- hooks ----------------------------------------------------------------------------------------------

@hookimpl
def sft_describe(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": "checkpoint every decoder layer and keep its input in pinned host memory (async copies, "
                   "prefetched in backward), within a host-memory budget",
        "loss_parity": 1e-5,  # the same math with the same RNG and autocast state (fp32: equal to rounding)
    }


@hookimpl
def sft_check(names: list[str], args: Any, model: Any, options: dict[str, Any]) -> list[str]:
    return _option_errors(options) + _args_errors(args) + _model_errors(model, options)


@hookimpl
def sft_update_args(args: Any, options: dict[str, Any]) -> dict[str, Any] | None:
    if args is None:  # e.g. a custom training loop: nothing will re-enable torch's checkpointing
        return None
    # Trainer would call gradient_checkpointing_enable() and replace our per-layer functions; another
    # plugin asking for True conflicts with this and the stack refuses the pair.
    return {"gradient_checkpointing": False}


@hookimpl
def sft_patch_model(model: Any, args: Any, options: dict[str, Any]) -> Callable[[], None]:
    errors = _option_errors(options) + _args_errors(args) + _model_errors(model, options)
    if errors:  # prepare() ran sft_check already; this guards direct calls
        raise PluginError(f"{NAME}: " + "; ".join(errors))
    for patch in _ACTIVE:
        if any(id(layer) in patch.funcs for layer in _ckpt_layers(model)):
            raise PluginError(f"{NAME} is already applied to this model: undo the other stack first")
    patch = _apply(model, args, _options(options))
    _ACTIVE.append(patch)
    ref = weakref.ref(patch)

    def undo() -> None:
        live = ref()
        if live is not None:
            _restore(live)

    return undo


@functools.lru_cache(maxsize=1)
def _guard_class() -> type:
    from transformers import TrainerCallback

    class SmartCheckpointingGuard(TrainerCallback):
        """Fails loudly if something replaced our checkpointing after prepare() (a silent no-op otherwise)."""

        def _check(self, args: Any, model: Any) -> None:
            flag = getattr(args, "activation_checkpointing", getattr(args, "gradient_checkpointing", False))
            if flag:
                raise PluginError(f"args.gradient_checkpointing was turned back on after {NAME} prepared them; "
                                  "the trainer would replace our checkpointing: leave it False")
            ids = {id(m) for m in model.modules()} if model is not None else None
            for patch in _ACTIVE:
                if ids is not None and not (patch.layers and id(patch.layers[0]) in ids):
                    continue  # another stack's model
                if not patch.intact():
                    raise PluginError(f"{NAME}'s checkpointing function was replaced on the model (by "
                                      "gradient_checkpointing_enable() or another plugin) after prepare(): "
                                      "don't enable checkpointing yourself, or drop " + NAME)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._check(args, kwargs.get("model"))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._check(args, kwargs.get("model"))

    return SmartCheckpointingGuard


@hookimpl
def sft_callbacks(args: Any, options: dict[str, Any]) -> list[Any]:
    return [_guard_class()()]
