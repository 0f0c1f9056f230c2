"""The optimizer behind ``adamw_8bit``: bitsandbytes' (Paged)AdamW8bit with per-instance 32-bit state for
embeddings, a sync-free CUDA step calling the compiled (or our Triton) kernels directly, the probe that
proves bitsandbytes can step on the training device, and a state-memory meter.

torch and bitsandbytes are imported inside functions: the plugin's hook module imports this cheaply.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any


def optim_name(args: Any) -> str:
    optim = getattr(args, "optim", None)
    return str(getattr(optim, "value", optim))


def target_device(args: Any) -> str:
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


def probe(device: str, paged: bool) -> str | None:
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
                    grouped: dict[tuple[int, int], Any] = {}  # the Triton 8-bit updates by maps, for after the loop
                    for gindex, group in enumerate(self.param_groups):
                        for pindex, p in enumerate(group["params"]):
                            if p.grad is None:
                                continue
                            if len(self.state[p]) == 0:
                                self.init_state(group, p, gindex, pindex)
                            if device is None or not _launch_adam(kernels, self, group, p, gindex, pindex, device,
                                                                  grouped):
                                self.update_step(group, p, gindex, pindex)
                    if grouped:
                        _launch_grouped(kernels, grouped)
                    return loss

        Cls.__name__ = Cls.__qualname__ = base.__name__ + "FP32Embeddings"
        Cls.__module__ = __name__
        return Cls

    return {False: make(bnb.optim.AdamW8bit, False), True: make(bnb.optim.PagedAdamW8bit, True)}


@functools.cache
def _cuda_adam_kernels(kernel: str = "triton") -> dict[str, Any] | None:
    """bitsandbytes' compiled Adam kernels ``{"8bit": (fp32, fp16, bf16), "32bit": (...)}`` (and, for
    ``kernel="triton"``, our grouped 8-bit step as ``"triton"`` and its update record as ``"triton_update"``),
    or None when bitsandbytes' CUDA library is not loaded (CPU builds, other backends): then bitsandbytes' own
    path runs."""
    try:
        import ctypes

        from bitsandbytes.backends.cuda import ops

        found = {"8bit": tuple(ops.str2optimizer8bit_blockwise["adam"]),
                 "32bit": tuple(ops.str2optimizer32bit["adam"]), "ctypes": ctypes, "triton": None}
    except Exception:  # noqa: BLE001 - any import or lookup failure means "use the generic path"
        return None
    if kernel == "triton":
        try:
            import triton  # noqa: F401  (the kernel compiles lazily: check Triton is there now)

            from ...kernels import Adam8bitUpdate, adam8bit_blockwise_step_grouped_

            found["triton"], found["triton_update"] = adam8bit_blockwise_step_grouped_, Adam8bitUpdate
        except Exception:  # noqa: BLE001 - no usable Triton: bitsandbytes' kernel does the 8-bit updates
            found["triton"] = None
    return found


def _launch_adam(kernels: dict[str, Any], opt: Any, group: dict[str, Any], p: Any, gindex: int, pindex: int,
                 device: int, grouped: dict[tuple[int, int], Any]) -> bool:
    """One parameter's Adam update through bitsandbytes' compiled kernel, called directly, or, for an 8-bit
    state with ``kernel="triton"``, queued in ``grouped`` under its state's two maps: the step then makes one
    Triton launch per (dtype pair, maps) for all of them, since with LoRA's hundreds of small adapters one
    launch each made the step launch-bound.

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
        qmap1, qmap2 = state["qmap1"], state["qmap2"]
        grouped.setdefault((id(qmap1), id(qmap2)), (qmap1, qmap2, []))[2].append(kernels["triton_update"](
            p, grad, state1, state["state2"], state["absmax1"], state["absmax2"], betas[0], betas[1],
            config["eps"], state["step"], config["lr"], config["weight_decay"]))
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


def _launch_grouped(kernels: dict[str, Any], grouped: dict[tuple[int, int], Any]) -> None:
    """The updates :func:`_launch_adam` queued: one Triton launch per (dtype pair, maps)."""
    for qmap1, qmap2, updates in grouped.values():
        kernels["triton"](updates, qmap1, qmap2)


def find_optimizer(optimizer: Any) -> Any:
    """Our optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper(s), or None."""
    classes = tuple(optimizer_classes().values())
    seen = 0
    while optimizer is not None and not isinstance(optimizer, classes) and seen < 8:
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return optimizer if isinstance(optimizer, classes) else None


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
