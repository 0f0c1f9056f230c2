"""adamw_8bit: the trainer's optimizer becomes bitsandbytes' 8-bit AdamW.

The plugin answers only ``optimizer_cls_and_kwargs=``: the unmodified ``Trainer.create_optimizer``
still builds the parameter groups (trainable parameters only; decay vs no-decay by its own
``get_decay_parameter_names``) and hands them to our class, so the grouping is Trainer's by
construction rather than re-implemented here. The kwargs carry the args' learning rate, betas, eps and
weight decay.

Embedding and lm_head parameters keep 32-bit state (what HF does for ``nn.Embedding`` when
``optim="adamw_bnb_8bit"``): their rows are updated sparsely and 8-bit blockwise quantisation of rare
tokens' moments hurts. HF does it through bitsandbytes' ``GlobalOptimManager``, a process-global
singleton keyed by ``id(param)`` that is never cleared; ids are recycled after garbage collection, so
an override could leak into the next ablation arm's model. We give the same override per optimizer
instance instead (``get_config`` of a thin subclass), which leaves no process-global state behind:
``undo()`` has nothing to restore, and a user's own ``GlobalOptimManager`` overrides still win.

Refusals (``sft_check``, each naming the fix): bitsandbytes missing or unable to step on the training
device (probed), ``args.optim`` naming another optimizer, ``optim_args``/``optim_target_modules``,
DeepSpeed, FSDP, ``paged`` off CUDA. ``optimizers=``/``optimizer_cls_and_kwargs=`` given by the user are
refused by the core whenever a plugin supplies the optimizer.

The step (non-paged, CUDA) calls the kernels directly instead of through bitsandbytes' per-parameter
Python (a device sync and ~100 us of host work per tensor); the 8-bit updates run in our Triton kernel
(``kernels/_triton_adam8bit.py``: bitsandbytes' state format and CUDA arithmetic, twice its speed),
``kernel="bitsandbytes"`` keeps its own. Paged and CPU optimizers step exactly as bitsandbytes does.

torch, transformers and bitsandbytes are imported inside functions only: listing plugins stays cheap.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from .._markers import hookimpl
from ._fsdp import fsdp_requested

DEFAULT_OPTIONS: dict[str, Any] = {
    "paged": False,           # PagedAdamW8bit: state in CUDA unified memory, evicted to host under pressure
    "fp32_embeddings": True,  # 32-bit state for nn.Embedding and lm_head parameters, as HF does
    "min_8bit_size": 4096,    # bitsandbytes' default: smaller tensors keep 32-bit state
    "kernel": "triton",       # 8-bit updates on CUDA: "triton" (ours, same state format, 2x faster on an
                              # H200) or "bitsandbytes" (its compiled kernel); CPU always uses bitsandbytes
}
_KERNELS = ("triton", "bitsandbytes")
# args.optim values the plugin may stand in for: the AdamW defaults (transformers picks
# adamw_torch_fused on torch >= 2.8, adamw_torch before) and HF's own bitsandbytes 8-bit AdamW names,
# which ask for exactly what this plugin supplies. Anything else would be silently ignored by Trainer
# once optimizer_cls_and_kwargs is set, so it is refused.
_COMPATIBLE_OPTIM = {"adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "adamw_8bit"}
_PAGED_OPTIM = {"paged_adamw_8bit"}


def _options(options: dict[str, Any] | None) -> dict[str, Any]:
    return {**DEFAULT_OPTIONS, **(options or {})}


def _option_errors(options: dict[str, Any]) -> list[str]:
    errors = []
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        errors.append(f"unknown option(s) {unknown}; adamw_8bit takes {sorted(DEFAULT_OPTIONS)}")
    opts = _options(options)
    for key in ("paged", "fp32_embeddings"):
        if not isinstance(opts[key], bool):
            errors.append(f"option {key!r} must be true or false, got {opts[key]!r}")
    if opts["kernel"] not in _KERNELS:
        errors.append(f"option 'kernel' must be one of {list(_KERNELS)}, got {opts['kernel']!r}")
    size = opts["min_8bit_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        errors.append(f"option 'min_8bit_size' must be a positive integer, got {size!r}")
    return errors


def _optim_name(args: Any) -> str:
    optim = getattr(args, "optim", None)
    return str(getattr(optim, "value", optim))


def _target_device(args: Any) -> str:
    """The device type the Trainer will train on, decided like ``TrainingArguments`` does, without
    touching ``args.device`` (that initialises accelerate's process state as a side effect)."""
    import torch

    if getattr(args, "use_cpu", False):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        current = accelerator.current_accelerator()
        if current is not None:
            return current.type
    return "cpu"


def _probe(device: str, paged: bool) -> str | None:
    """Step a bitsandbytes 8-bit AdamW once on ``device``; return why it cannot, or None.

    Importing bitsandbytes succeeds even when its native library lacks the device (it only warns),
    so a real step is the only reliable test. It costs a few milliseconds.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        return (f"bitsandbytes is not installed ({exc}): `pip install bitsandbytes>=0.45`, "
                "or drop the adamw_8bit plugin")
    import torch

    if paged and device != "cuda":
        return (f"option paged=true needs CUDA unified memory, but training runs on {device} (bitsandbytes "
                "would silently fall back to non-paged state): drop the paged option")
    version = getattr(bnb, "__version__", "?")
    page_manager = getattr(getattr(bnb, "functional", None), "GlobalPageManager", None)
    pages: list[Any] = page_manager.get_instance().paged_tensors if page_manager is not None else []
    n_pages = len(pages)
    try:
        cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
        # >= 1e5 elements so that a paged buffer is really allocated; >= min_8bit_size for 8-bit state
        p = torch.nn.Parameter(torch.zeros(1 << 17, device=device))
        p.grad = torch.full_like(p, 1e-3)
        opt = cls([p], lr=1e-3)
        opt.step()
        if opt.state[p]["state1"].dtype != torch.uint8:
            return f"bitsandbytes {version} kept 32-bit state on {device}: upgrade with `pip install -U bitsandbytes`"
        if not torch.isfinite(p).all():
            return f"bitsandbytes {version} produced non-finite values on {device}"
    except Exception as exc:  # any failure of the native library means: cannot run here
        return (f"bitsandbytes {version} cannot step AdamW8bit on {device} ({type(exc).__name__}: {exc}): "
                f"install a bitsandbytes build with {device} support (`pip install -U bitsandbytes`), "
                "or drop the adamw_8bit plugin")
    finally:
        del pages[n_pages:]  # the probe's paged buffer must not stay in bitsandbytes' global prefetch list
    return None


def embedding_parameters(model: Any) -> list[Any]:
    """Parameters whose optimizer state stays 32-bit: every ``nn.Embedding`` (HF's rule) and the
    output embeddings (lm_head), which are tied to the input embeddings in many models anyway."""
    import torch

    if model is None or not isinstance(model, torch.nn.Module):
        return []
    found: dict[int, Any] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            found.update((id(p), p) for p in module.parameters())
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if isinstance(head, torch.nn.Module):
        found.update((id(p), p) for p in head.parameters())
    return list(found.values())


@functools.cache
def optimizer_classes() -> dict[bool, type]:
    """``{paged: class}``: bitsandbytes' AdamW8bit / PagedAdamW8bit with a per-instance override that
    keeps 32-bit state for the parameters given as ``fp32_params``. Built once, so that ``isinstance``
    checks and ``Trainer``'s class-based logic see one stable class per variant."""
    import bitsandbytes as bnb
    import torch

    def make(base: type, paged: bool) -> type:
        class Cls(base):  # type: ignore[misc, valid-type]
            def __init__(self, params: Any, *, fp32_params: Iterable[Any] = (), kernel: str = "triton",
                         **kwargs: Any) -> None:
                super().__init__(params, **kwargs)
                self.kernel = kernel
                self.fp32_param_ids: set[int] = set()
                self.add_fp32_params(fp32_params)

            def add_fp32_params(self, params: Iterable[Any]) -> None:
                # ids are stable: the optimizer holds its parameters alive
                self.fp32_param_ids.update(id(p) for p in params)

            def get_config(self, gindex: int, pindex: int, group: dict[str, Any]) -> dict[str, Any]:
                config = super().get_config(gindex, pindex, group)
                p = self.param_groups[gindex]["params"][pindex]
                user = {**self.mng.index2config.get((gindex, pindex), {}), **self.mng.pid2config.get(id(p), {})}
                if id(p) in self.fp32_param_ids and "optim_bits" not in user:
                    config["optim_bits"] = 32  # read only when the state is first created
                return config

            if not paged:
                @torch.no_grad()
                def step(self, closure: Any = None) -> Any:
                    # bitsandbytes' Optimizer8bit.step synchronises the device after every parameter
                    # (its paged, unified-memory state needs that): ~150 host round trips per step on a
                    # 1B model. Without paging the updates are ordinary kernels queued on one stream,
                    # so the same loop without the syncs computes the same thing, without the stalls.
                    loss = None
                    if closure is not None:
                        with torch.enable_grad():
                            loss = closure()
                    if not self.initialized:
                        self.check_overrides()
                        self.to_gpu()
                        self.initialized = True
                    kernels = _cuda_adam_kernels(self.kernel) if self.optimizer_name == "adam" else None
                    device = torch.cuda.current_device() if kernels is not None and torch.cuda.is_available() else None
                    for gindex, group in enumerate(self.param_groups):
                        for pindex, p in enumerate(group["params"]):
                            if p.grad is None:
                                continue
                            if len(self.state[p]) == 0:
                                self.init_state(group, p, gindex, pindex)
                            if device is None or not _launch_adam(kernels, self, group, p, gindex, pindex, device):
                                self.update_step(group, p, gindex, pindex)
                    return loss

        Cls.__name__ = Cls.__qualname__ = base.__name__ + "FP32Embeddings"
        Cls.__module__ = __name__
        return Cls

    return {False: make(bnb.optim.AdamW8bit, False), True: make(bnb.optim.PagedAdamW8bit, True)}


@functools.cache
def _cuda_adam_kernels(kernel: str = "triton") -> dict[str, Any] | None:
    """bitsandbytes' compiled Adam kernels ``{"8bit": (fp32, fp16, bf16), "32bit": (...)}`` (and, for
    ``kernel="triton"``, our 8-bit step as ``"triton"``), or None when bitsandbytes' CUDA library is not
    loaded (CPU builds, other backends): then bitsandbytes' own path runs."""
    try:
        import ctypes

        from bitsandbytes.backends.cuda import ops

        found = {"8bit": tuple(ops.str2optimizer8bit_blockwise["adam"]),
                 "32bit": tuple(ops.str2optimizer32bit["adam"]), "ctypes": ctypes, "triton": None}
    except Exception:  # noqa: BLE001 - any import or lookup failure means "use the generic path"
        return None
    if kernel == "triton":
        try:
            from ..kernels import _triton_adam8bit

            found["triton"] = _triton_adam8bit.adam8bit_blockwise_step_
        except Exception:  # noqa: BLE001 - no usable Triton: bitsandbytes' kernel does the 8-bit updates
            found["triton"] = None
    return found


def _launch_adam(kernels: dict[str, Any], opt: Any, group: dict[str, Any], p: Any, gindex: int, pindex: int,
                 device: int) -> bool:
    """One parameter's Adam update through bitsandbytes' compiled kernel, called directly.

    bitsandbytes' ``update_step`` reaches the same kernel through ~100 us of Python per parameter
    (re-assigning ``.data``/``.grad``, a config dict, an ``is_on_gpu`` scan, the torch.library dispatch,
    ctypes argument boxing); with ~150 parameters that host time, not the kernels, set the step time.
    Same kernel, same arguments, same order: bit-identical results. With ``kernel="triton"`` the 8-bit
    updates go to our Triton kernel instead (same state format and arithmetic, to rounding; bitsandbytes'
    kernel streams at a fraction of the bandwidth). Returns False (caller falls back to
    ``update_step``) for anything but the plain case: CPU or non-current-device tensors, non-contiguous
    tensors, an update-norm clip, AdEMAMix-style extra betas, or a dtype without a kernel.
    """
    grad, state = p.grad, opt.state[p]
    if not (p.is_cuda and p.is_contiguous() and grad.is_contiguous()) or p.device.index != device:
        return False
    config = opt.get_config(gindex, pindex, group)
    betas = config["betas"]
    if config["max_unorm"] > 0.0 or len(betas) > 2 or config.get("alpha", 0.0):
        return False
    dtype_index = {"torch.float32": 0, "torch.float16": 1, "torch.bfloat16": 2}.get(str(grad.dtype))
    state1 = state["state1"]
    bits = "8bit" if state1.dtype.itemsize == 1 else "32bit"
    if dtype_index is None or dtype_index >= len(kernels[bits]):
        return False
    ct = kernels["ctypes"]
    state["step"] += 1

    def ptr(t: Any) -> Any:
        return None if t is None else ct.c_void_p(t.data_ptr())

    f32 = ct.c_float
    common = (f32(betas[0]), f32(betas[1]), f32(0.0), f32(0.0), f32(config["eps"]))
    if bits == "8bit" and kernels["triton"] is not None:
        kernels["triton"](p, grad, state1, state["state2"], state["qmap1"], state["qmap2"], state["absmax1"],
                          state["absmax2"], beta1=betas[0], beta2=betas[1], eps=config["eps"], step=state["step"],
                          lr=config["lr"], weight_decay=config["weight_decay"])
    elif bits == "8bit":
        kernels[bits][dtype_index](
            ptr(p), ptr(grad), ptr(state1), ptr(state["state2"]), *common, ct.c_int32(state["step"]),
            f32(config["lr"]), ptr(state["qmap1"]), ptr(state["qmap2"]), ptr(state["absmax1"]),
            ptr(state["absmax2"]), f32(config["weight_decay"]), f32(1.0), ct.c_bool(config["skip_zeros"]),
            ct.c_int32(grad.numel()))
    else:
        kernels[bits][dtype_index](
            ptr(grad), ptr(p), ptr(state1), ptr(state["state2"]), None, f32(0.0), f32(0.0), *common,
            f32(config["weight_decay"]), ct.c_int32(state["step"]), f32(config["lr"]), f32(1.0),
            ct.c_bool(config["skip_zeros"]), ct.c_int32(grad.numel()))
    return True


def find_optimizer(optimizer: Any) -> Any:
    """Our optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper(s), or None."""
    classes = tuple(optimizer_classes().values())
    seen = 0
    while optimizer is not None and not isinstance(optimizer, classes) and seen < 8:
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return optimizer if isinstance(optimizer, classes) else None


@functools.cache
def _callback_class() -> type:
    from transformers import TrainerCallback

    class AdamW8bitEmbeddingsCallback(TrainerCallback):
        """Re-reads the embedding parameters from the trainer's own model at train begin.

        The model given to ``prepare`` may be a string, or be wrapped later (PEFT's
        ``modules_to_save`` copies embeddings into new parameters). The optimizer is built before
        ``on_train_begin`` but creates its state lazily at the first step, so adding ids here is in time.
        """

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                           optimizer: Any = None, **kwargs: Any) -> None:
            ours = find_optimizer(optimizer)
            if ours is not None:
                ours.add_fp32_params(embedding_parameters(model))

    return AdamW8bitEmbeddingsCallback


# -- hooks -----------------------------------------------------------------------------------------


@hookimpl
def sft_describe(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": "bitsandbytes 8-bit AdamW (paged optional) as the trainer's optimizer: ~2 bytes of state "
                   "per parameter instead of 8; embeddings and lm_head keep 32-bit state",
        # 8-bit moments change the updates, so per-step losses drift from fp32 AdamW by design;
        # parity is measured as convergence (tests: final loss within 2% after 200 steps).
        "loss_parity": None,
    }


@hookimpl
def sft_check(args: Any, options: dict[str, Any]) -> list[str]:
    errors = _option_errors(options)
    if errors:
        return errors
    opts = _options(options)
    if args is None:
        return ["adamw_8bit reads the learning rate, betas, eps and weight decay from the training arguments: "
                "pass args=SFTConfig(...) or args=TrainingArguments(...) to prepare()"]
    optim = _optim_name(args)
    if optim in _PAGED_OPTIM and not opts["paged"]:
        errors.append(f"args.optim={optim!r} asks for paged state: compose with "
                      "options={'adamw_8bit': {'paged': True}}, or leave optim at its default")
    elif optim not in _COMPATIBLE_OPTIM | _PAGED_OPTIM:
        errors.append(f"args.optim={optim!r} asks for another optimizer, which adamw_8bit would replace: "
                      "leave optim at its default (adamw_torch_fused) or drop the adamw_8bit plugin")
    if getattr(args, "optim_args", None):
        errors.append(f"args.optim_args={args.optim_args!r} would be ignored by adamw_8bit: unset it")
    if getattr(args, "optim_target_modules", None):
        errors.append("args.optim_target_modules (GaLore/APOLLO) does not apply to adamw_8bit: unset it")
    if getattr(args, "deepspeed", None):
        errors.append("DeepSpeed builds or wraps its own optimizer: use its optimizer config instead of "
                      "adamw_8bit, or drop args.deepspeed")
    fsdp = fsdp_requested(args)  # args.fsdp, or accelerate's environment (`accelerate launch --use_fsdp`)
    if fsdp:
        where = "args.fsdp" if fsdp == "args" else "FSDP in the accelerate config / ACCELERATE_USE_FSDP"
        errors.append(f"adamw_8bit is not verified with FSDP (sharded DTensor parameters, sharded 8-bit state): "
                      f"drop {where}, or the plugin")
    problem = _probe(_target_device(args), opts["paged"])
    if problem:
        errors.append(problem)
    return errors


@hookimpl
def sft_optimizer_cls_and_kwargs(model: Any, args: Any, options: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    opts = _options(options)
    cls = optimizer_classes()[bool(opts["paged"])]
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        # Trainer sets weight_decay on each group (args.weight_decay or 0.0 for bias/norm); this
        # default only matters for a group without it, and must not be bitsandbytes' 1e-2.
        "weight_decay": args.weight_decay,
        "min_8bit_size": int(opts["min_8bit_size"]),
        "fp32_params": embedding_parameters(model) if opts["fp32_embeddings"] else [],
        "kernel": opts["kernel"],
    }
    return cls, kwargs


@hookimpl
def sft_callbacks(args: Any, options: dict[str, Any]) -> list[Any]:
    if not _options(options)["fp32_embeddings"]:
        return []
    return [_callback_class()()]


def _leaf_tensors(value: Any) -> list[Any]:
    """Plain tensors behind ``value``; tensor subclasses (torchao's 8-bit state) are flattened."""
    import torch

    if not isinstance(value, torch.Tensor):
        return []
    flatten = getattr(value, "__tensor_flatten__", None)
    if type(value) not in (torch.Tensor, torch.nn.Parameter) and callable(flatten):
        names, _ = flatten()
        return [t for name in names for t in _leaf_tensors(getattr(value, name))]
    return [value]


def state_bytes(optimizer: Any) -> dict[str, Any]:
    """Optimizer state memory measured from the state tensors: total bytes, and bytes per parameter
    overall, for parameters with 8-bit state, and for those with 32-bit (or other) state.

    A storage shared by several parameters' state (bitsandbytes' quantisation maps) counts once in the
    total and in no parameter's share. Works for torch, bitsandbytes and torchao optimizers.
    """
    import torch

    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer
    owners: dict[int, set[int]] = {}
    sizes: dict[int, int] = {}
    per_param: dict[int, tuple[Any, list[int], bool]] = {}
    for p, st in optimizer.state.items():
        keys, quantized = [], False
        for value in st.values():
            for t in _leaf_tensors(value):
                storage = t.untyped_storage()
                key = storage.data_ptr() or id(storage)
                sizes[key] = storage.nbytes()
                owners.setdefault(key, set()).add(id(p))
                keys.append(key)
                quantized |= t.dtype in (torch.uint8, torch.int8) and t.numel() > 1
        per_param[id(p)] = (p, keys, quantized)
    q_bytes = q_params = f_bytes = f_params = 0
    for p, keys, quantized in per_param.values():
        own = sum(sizes[k] for k in set(keys) if len(owners[k]) == 1)
        if quantized:
            q_bytes, q_params = q_bytes + own, q_params + p.numel()
        else:
            f_bytes, f_params = f_bytes + own, f_params + p.numel()
    total, n = sum(sizes.values()), q_params + f_params
    return {
        "state_bytes": total,
        "params_with_state": n,
        "bytes_per_param": total / n if n else 0.0,
        "params_8bit": q_params,
        "bytes_per_param_8bit": q_bytes / q_params if q_params else None,
        "params_32bit": f_params,
        "bytes_per_param_32bit": f_bytes / f_params if f_params else None,
    }
