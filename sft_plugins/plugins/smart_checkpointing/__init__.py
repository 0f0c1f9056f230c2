"""smart_checkpointing: checkpoint every decoder layer and keep its input in host memory.

How it plugs in. transformers checkpoints a ``GradientCheckpointingLayer`` by calling that layer's
``_gradient_checkpointing_func`` when its ``gradient_checkpointing`` flag is set; ``Trainer`` sets both
(through ``gradient_checkpointing_enable``) when ``args.gradient_checkpointing`` is True, which TRL
makes the default. We set the flag and our own per-layer function on each layer, and set
``gradient_checkpointing=False`` in the args so the trainer does not replace our function with
torch's. This keeps transformers' own handling of ``use_cache`` and the KV cache under checkpointing,
works on transformers 5.17 and 5.24 alike, and is undone by restoring two attributes per module.

The function (``checkpoint.py``, host memory in ``offload.py``) recomputes the layer in backward like torch's checkpoint, but the
layer's input lives on the host in between (side stream, pinned buffers reused every step, copied
back one layer ahead). Exactness: the same ops run in the recompute, with the RNG and autocast state
of the forward, so losses and gradients equal those without checkpointing; the lean recompute
(``lean_mlp``, also in the layer's first forward, and ``lean_norm``) runs the SwiGLU MLP and the RMSNorms
as fused functions with the same math, equal up to summation order; ``lean_lora_cast`` skips PEFT's fp32
copy of each LoRA input where autocast casts it straight back (the same values). Under FSDP2 the
recompute accumulates into the unsharded parameters FSDP swaps in, and FSDP reduce-scatters them.

torch and transformers are imported inside functions only: listing plugins stays cheap.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

from ..._errors import PluginError
from ..._markers import hookimpl
from ..._options import Option
from ..shared import fsdp_requested
from .patch import MERGEABLE_KWARGS, NAME, checkpoint_layers, checkpointing_kwargs, is_standard_func, mlp_of, patch_of

OPTIONS = [
    Option("offload", "auto", "auto: offload CUDA layer inputs to host memory; never: plain checkpointing; "
           "always: also copy CPU inputs through the host pool (exercises it without a GPU)",
           choices=("auto", "never", "always")),
    Option("host_budget_gb", None, "pinned host buffers, GiB (None: min(25% of RAM, 50% available now) / "
           "local ranks)", type=float, minimum=0, nullable=True),
    Option("overflow", "gpu", "past the host budget: 'gpu' keeps inputs on the GPU, 'pageable' uses pageable RAM",
           choices=("gpu", "pageable")),
    Option("pageable_budget_gb", None, "pageable RAM for overflow='pageable', GiB (None: as host_budget_gb)",
           type=float, minimum=0, nullable=True),
    Option("host_reserve_gb", None, "never allocate below this much available RAM, GiB (None: max(2 GiB, 5% "
           "of RAM))", type=float, minimum=0, nullable=True),
    Option("keep_last_on_gpu", 1, "the last k checkpointed layers keep their input on the GPU (needed first)",
           type=int, minimum=0),
    Option("prefetch", 1, "layers ahead that backward copies inputs back (0: on demand, leanest)", type=int,
           minimum=0),
    Option("preserve_rng_state", True, "replay dropout exactly in the recompute (as torch's checkpoint)",
           type=bool),
    Option("every_n_layers", 1, "checkpoint one layer in n (HF's every_n_layers)", type=int, minimum=1),
    Option("mlp_chunks", "auto", "run each layer's MLP in this many sequence chunks in the recompute (less "
           "memory, one more MLP forward); auto: only when GPU memory is short; 0: never", type=int, minimum=0,
           choices=("auto",)),
    Option("lean_mlp", "auto", "SwiGLU MLPs through a fused recompute keeping 2.25 [tokens, intermediate] "
           "tensors at the peak instead of ~8; auto: where it applies, true: refuse a model where none does",
           type=bool, choices=("auto",)),
    Option("memory_budget", "tight", "GPU memory the plugin may spend on not recomputing: 'tight' (every layer "
           "checkpointed and offloaded), 'auto' (what the device allows), a fraction (<= 1) of it, or GiB; the "
           "first step measures, then the last layers keep their activations and the next ones their input on "
           "the GPU, as many as fit", choices=("tight", "auto"), type=float, minimum=0),
    Option("lean_norm", "auto", "Llama-style RMSNorms through a fused recompute keeping no fp32 copy of their "
           "input; auto: where it applies", type=bool, choices=("auto",)),
    Option("lean_lora_cast", True, "under autocast, PEFT LoRA layers in the checkpointed layers skip casting "
           "their input to the fp32 adapters' dtype, a copy autocast casts straight back (same values, no "
           "dropout or LoRA variant)", type=bool),
]


def _args_errors(args: Any) -> list[str]:
    if args is None:
        return []
    errors = []
    if getattr(args, "activation_offloading", False):
        errors.append("TRL's activation_offloading=True offloads every saved tensor through its own hooks and "
                      "would fight ours over the checkpointed inputs: set activation_offloading=False "
                      f"({NAME} offloads them), or drop {NAME}")
    kwargs = checkpointing_kwargs(args)
    if kwargs.get("selective"):
        errors.append("gradient_checkpointing_kwargs={'selective': True} (TRL's selective checkpointing) saves "
                      f"tensors inside each layer, which {NAME} recomputes: drop 'selective' or drop {NAME}")
    if "offload" in kwargs and not kwargs["offload"]:
        errors.append(f"gradient_checkpointing_kwargs asks for offload=False but {NAME} offloads: drop the "
                      f"'offload' key, or pass options={{'{NAME}': {{'offload': 'never'}}}}")
    other = sorted(set(kwargs) - MERGEABLE_KWARGS - {"selective"})
    if other:
        errors.append(f"gradient_checkpointing_kwargs {other} have no equivalent in {NAME} (it merges "
                      f"{sorted(MERGEABLE_KWARGS)}): drop them or drop {NAME}")
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


def _model_errors(model: Any, options: dict[str, Any]) -> list[str]:
    if model is None or isinstance(model, str):
        return [] if model is None else [f"{NAME} patches the model: pass a model instance, not {model!r}"]
    layers = checkpoint_layers(model)
    if not layers:
        return [f"{type(model).__name__} has no transformers GradientCheckpointingLayer modules, so {NAME} "
                "cannot checkpoint its layers: use args.gradient_checkpointing=True instead"]
    custom = {type(fn).__name__ if not callable(fn) else getattr(fn, "__qualname__", repr(fn))
              for m in model.modules() if (fn := m.__dict__.get("_gradient_checkpointing_func")) is not None
              and not is_standard_func(fn)}
    if custom:
        return [f"the model's layers already carry a custom checkpointing function ({sorted(custom)}): another "
                f"plugin or library patched checkpointing; undo it first or drop {NAME}"]
    opts = options
    chunks = opts["mlp_chunks"]
    if chunks != "auto" and chunks and any(mlp_of(layer) is None for layer in layers):
        return [f"option mlp_chunks needs a dense MLP at layer.mlp in every layer (token-wise, e.g. LlamaMLP); "
                f"{type(layers[0]).__name__} has {type(getattr(layers[0], 'mlp', None)).__name__}: set mlp_chunks=0"]
    if opts["lean_mlp"] is True:  # "auto" uses it where it applies, silently
        from .lean_mlp import _plan

        if not any((mlp := mlp_of(layer)) is not None and _plan(mlp) is not None for layer in layers):
            return ["option lean_mlp needs SwiGLU MLPs (gate_proj, up_proj, down_proj, SiLU; plain, frozen 4-bit "
                    "or vanilla-LoRA projections without dropout; not 8-bit LLM.int8()); "
                    f"{type(getattr(layers[0], 'mlp', None)).__name__} is not one: set lean_mlp=False"]
    if opts["lean_norm"] is True:
        from .lean_norm import layer_norms

        if not any(layer_norms(layer) for layer in layers):
            return [f"option lean_norm needs Llama-style RMSNorms in the layers (transformers' LlamaRMSNorm code); "
                    f"{type(layers[0]).__name__} has none: set lean_norm=False"]
    return []


def stats(model: Any) -> dict[str, Any]:
    """The offloader's counters for a model patched by this plugin (bytes offloaded, kept, fallen back)."""
    patch = patch_of(model)
    if patch is None:
        raise PluginError(f"{type(model).__name__} is not patched by {NAME}")
    return patch.offloader.stats()


# -- hooks ----------------------------------------------------------------------------------------------

@hookimpl
def sft_describe(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": "checkpoint every decoder layer and keep its input in pinned host memory (async copies, "
                   "prefetched in backward), within a host-memory budget",
        "loss_parity": 1e-5,  # the same math with the same RNG and autocast state (fp32: equal to rounding)
        "quantized": "as on bf16; lean_mlp dequantises 4-bit projections with bitsandbytes' kernel; 8-bit "
                     "(LLM.int8()) MLPs recompute through bitsandbytes itself",
    }


@hookimpl
def sft_options() -> list[Option]:
    return OPTIONS


@hookimpl
def sft_check(args: Any, model: Any, options: dict[str, Any]) -> list[str]:
    return _args_errors(args) + _model_errors(model, options)


@hookimpl
def sft_update_args(args: Any, options: dict[str, Any]) -> dict[str, Any] | None:
    if args is None:  # e.g. a custom training loop: nothing will re-enable torch's checkpointing
        return None
    # Trainer would call gradient_checkpointing_enable() and replace our per-layer functions; another
    # plugin asking for True conflicts with this and the stack refuses the pair.
    return {"gradient_checkpointing": False}


@hookimpl
def sft_patch_model(model: Any, args: Any, options: dict[str, Any], state: SimpleNamespace) -> Callable[[], None]:
    from .patch import apply_patch

    errors = _args_errors(args) + _model_errors(model, options)
    if errors:  # prepare() ran sft_check already; this guards direct calls
        raise PluginError(f"{NAME}: " + "; ".join(errors))
    if patch_of(model) is not None:
        raise PluginError(f"{NAME} is already applied to this model: undo the other stack first")
    state.patch, undo = apply_patch(model, args, options)
    return undo


@hookimpl
def sft_callbacks(args: Any, options: dict[str, Any], state: SimpleNamespace) -> list[Any]:
    from .guard import SmartCheckpointingGuard

    patch = getattr(state, "patch", None)
    if patch is None:
        return []
    callbacks = [SmartCheckpointingGuard(patch)]
    if patch.budget is not None:
        from .budget import make_planner

        callbacks.append(make_planner(patch, args, options["keep_last_on_gpu"]))
    return callbacks
