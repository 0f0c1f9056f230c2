"""Offloaded activation checkpointing: the machinery behind the ``smart_checkpointing`` plugin.

A checkpointed layer keeps only its input for backward. Here that input is copied to host memory on
a side CUDA stream while the layer itself runs (so the copy hides behind compute), into a buffer that
belongs to that layer and is reused every step. In backward, when layer ``i`` is about to be
recomputed, the input of the layer that comes next in backward is already being copied back on the
side stream, so that copy hides behind layer ``i``'s recompute and backward.

Host memory is bounded: buffers come out of a budget (pinned memory with CUDA); past it a layer's
input goes to pageable memory (``overflow="pageable"``, within its own budget) or stays on the GPU
(``overflow="gpu"``). No allocation is made that would leave the host with less than a reserve of
available RAM, so the host is never driven into OOM.

Imported only from inside the plugin's hooks: it imports torch at module level.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ._fsdp import is_dtensor, is_fsdp_module

logger = logging.getLogger("sft_plugins")

GiB = 1 << 30


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of host RAM."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except ImportError:  # psutil is a TRL dependency, but keep a fallback for plain-Trainer installs
        info: dict[str, int] = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info[key] = int(value.split()[0]) * 1024
        return info["MemTotal"], info.get("MemAvailable", info["MemFree"])


def default_budget() -> int:
    """A safe default host budget: a quarter of the RAM, and never more than half of what is free now,
    shared by the training processes of this host (``LOCAL_WORLD_SIZE``, which torchrun and accelerate
    launch set): under DDP each rank offloads its own checkpoints into its own buffers."""
    total, available = host_memory()
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return int(min(0.25 * total, 0.5 * available) / ranks)


def default_reserve() -> int:
    """RAM left to the rest of the process and the system whatever the budgets say."""
    total, _ = host_memory()
    return int(max(2 * GiB, 0.05 * total))


def _pow2(n: int) -> int:
    # torch's caching host allocator rounds pinned blocks up to a power of two: count what is really pinned,
    # and use the whole block so a layer's buffer only grows when its input crosses a power of two.
    return 1 << max(0, (n - 1).bit_length())


def empty_host_cache() -> None:
    """Give torch's cached pinned blocks back to the OS (names differ across torch releases)."""
    for name in ("_accelerator_emptyHostCache", "_host_emptyCache"):
        fn = getattr(torch._C, name, None)
        if fn is not None:
            fn()
            return


@dataclass
class OffloadConfig:
    mode: str  # "offload": CUDA inputs go to host; "copy": also CPU inputs (tests); "keep": plain checkpointing
    host_budget: int  # bytes of host buffers (pinned when CUDA is available)
    overflow: str  # "gpu" or "pageable"
    pageable_budget: int
    host_reserve: int
    prefetch: int = 1
    preserve_rng_state: bool = True


class _Buffer:
    __slots__ = ("data", "kind", "pinned")

    def __init__(self, data: torch.Tensor, kind: str, pinned: bool):
        self.data = data
        self.kind = kind  # "host" (pinned with CUDA) or "pageable"
        self.pinned = pinned  # cached: is_pinned() asks the driver

    @property
    def capacity(self) -> int:
        return self.data.numel()

    def view(self, nbytes: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        return self.data[:nbytes].view(dtype).view(shape)


class HostPool:
    """Per-slot host buffers, reused across steps, inside the budgets. Callers hold the offloader's lock."""

    def __init__(self, config: OffloadConfig, pin: bool):
        self.config = config
        self.pin = pin
        self._free: dict[Any, list[_Buffer]] = {}
        self.held = {"host": 0, "pageable": 0}
        self.allocations = 0
        self._said_full = False

    def acquire(self, slot: Any, nbytes: int) -> _Buffer | None:
        free = self._free.setdefault(slot, [])
        fitting = [b for b in free if b.capacity >= nbytes]
        if fitting:
            buf = min(fitting, key=lambda b: b.capacity)
            free.remove(buf)
            return buf
        dropped_pinned = False
        for buf in free:  # too small for this step's input: give their bytes back before growing
            self.held[buf.kind] -= buf.capacity
            dropped_pinned |= buf.pinned
        free.clear()
        if dropped_pinned:
            empty_host_cache()  # rare (a power-of-two growth); otherwise torch would keep them pinned
        return self._allocate(nbytes)

    def release(self, slot: Any, buf: _Buffer) -> None:
        self._free.setdefault(slot, []).append(buf)

    def _allocate(self, nbytes: int) -> _Buffer | None:
        cfg, cap = self.config, _pow2(nbytes)
        _, available = host_memory()
        if available - cap < cfg.host_reserve:
            return self._full(f"host RAM available ({available / GiB:.1f} GiB) is near the reserve "
                              f"({cfg.host_reserve / GiB:.1f} GiB)")
        for kind, budget in (("host", cfg.host_budget), ("pageable", cfg.pageable_budget)):
            if kind == "pageable" and cfg.overflow != "pageable":
                break
            if self.held[kind] + cap > budget:
                continue
            pin = self.pin and kind == "host"
            try:
                data = torch.empty(cap, dtype=torch.uint8, pin_memory=pin)
            except RuntimeError as exc:  # pinning can fail (ulimit -l, driver); fall through, never crash
                logger.warning("smart_checkpointing: could not allocate %d MiB of %s memory: %s",
                               cap >> 20, kind, exc)
                continue
            self.held[kind] += cap
            self.allocations += 1
            return _Buffer(data, kind, pin)
        return self._full(f"host budget {cfg.host_budget / GiB:.3g} GiB"
                          + (f" + pageable {cfg.pageable_budget / GiB:.3g} GiB" if cfg.overflow == "pageable" else "")
                          + " is used up")

    def _full(self, why: str) -> None:
        if not self._said_full:
            self._said_full = True
            logger.warning("smart_checkpointing: %s; further layer inputs stay on the GPU", why)
        return None

    def close(self) -> None:
        pinned = any(b.pinned for bufs in self._free.values() for b in bufs)
        self._free.clear()
        self.held = {"host": 0, "pageable": 0}
        if pinned:
            empty_host_cache()


class _Entry:
    """One checkpointed input between its forward and its backward."""

    __slots__ = ("slot", "shape", "dtype", "device", "nbytes", "where", "tensor", "buf", "event")

    def __init__(self, slot: Any, x: torch.Tensor):
        self.slot, self.shape, self.dtype, self.device = slot, x.shape, x.dtype, x.device
        self.nbytes = x.numel() * x.element_size()
        self.where = "device"  # "device": kept; "host": in buf; "loading": copy back issued into tensor
        self.tensor: torch.Tensor | None = None
        self.buf: _Buffer | None = None
        self.event: Any = None


class _Token:
    """Held by the autograd node: if the graph dies without a backward, its buffer goes back to the pool."""

    __slots__ = ("offloader", "entry", "done")

    def __init__(self, offloader: Offloader, entry: _Entry):
        self.offloader, self.entry, self.done = offloader, entry, False

    def __del__(self) -> None:
        if not self.done:
            try:
                self.offloader.discard(self.entry)
            except Exception:  # interpreter shutdown: nothing left to give back to
                pass


class Offloader:
    """Moves checkpointed inputs to host and back, and counts what it did (see :meth:`stats`)."""

    def __init__(self, config: OffloadConfig):
        self.config = config
        self.pool = HostPool(config, pin=torch.cuda.is_available())
        # Backward runs on autograd worker threads and a _Token's __del__ may fire inside a locked region
        # (garbage collection during an allocation): reentrant, or that would deadlock.
        self._lock = threading.RLock()
        self._live: dict[int, _Entry] = {}  # forward order: the end is what backward needs next
        self._streams: dict[torch.device, Any] = {}
        self.counters = dict(calls=0, saved_bytes=0, host_bytes=0, pageable_bytes=0, kept_bytes=0,
                             fallback_bytes=0, plain_calls=0, fsdp_calls=0)

    def stats(self) -> dict[str, Any]:
        c = dict(self.counters)
        off = c["host_bytes"] + c["pageable_bytes"]
        c["offloaded_fraction"] = off / c["saved_bytes"] if c["saved_bytes"] else 0.0
        c["allocations"] = self.pool.allocations
        c["host_bytes_held"] = self.pool.held["host"]
        c["pageable_bytes_held"] = self.pool.held["pageable"]
        c["live"] = len(self._live)
        return c

    def reset_counters(self) -> None:
        for key in self.counters:
            self.counters[key] = 0

    def _stream(self, device: torch.device) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        return stream

    def _offloadable(self, x: torch.Tensor) -> bool:
        mode = self.config.mode
        return mode == "copy" or (mode == "offload" and x.is_cuda)

    # -- forward -----------------------------------------------------------------------------------
    def save(self, x: torch.Tensor, slot: Any, keep: bool) -> _Token:
        entry = _Entry((slot, x.device), x)
        with self._lock:
            self.counters["calls"] += 1
            self.counters["saved_bytes"] += entry.nbytes
            buf = None
            if keep or not self._offloadable(x):
                self.counters["kept_bytes"] += entry.nbytes
            else:
                buf = self.pool.acquire(entry.slot, entry.nbytes)
                if buf is None:
                    self.counters["fallback_bytes"] += entry.nbytes
                else:
                    self.counters[f"{buf.kind}_bytes"] += entry.nbytes
            self._live[id(entry)] = entry
        if buf is not None:
            host = buf.view(entry.nbytes, x.dtype, x.shape)
            if x.is_cuda:
                stream = self._stream(x.device)
                stream.wait_stream(torch.cuda.current_stream(x.device))  # x is produced on the compute stream
                with torch.cuda.stream(stream):
                    host.copy_(x, non_blocking=buf.pinned)
                x.record_stream(stream)  # x's memory is not reused before the copy has read it
            else:
                host.copy_(x)
            entry.buf, entry.where = buf, "host"
        return _Token(self, entry)

    # -- backward ----------------------------------------------------------------------------------
    def _start_load(self, entry: _Entry) -> None:
        """Issue the copy back to the device (lock held)."""
        if entry.where != "host" or entry.buf is None:
            return
        host = entry.buf.view(entry.nbytes, entry.dtype, entry.shape)
        if entry.device.type == "cuda":
            compute = torch.cuda.current_stream(entry.device)
            tensor = torch.empty(entry.shape, dtype=entry.dtype, device=entry.device)  # compute stream's pool
            stream = self._stream(entry.device)
            stream.wait_stream(compute)  # the block may still be read by queued compute kernels
            with torch.cuda.stream(stream):
                tensor.copy_(host, non_blocking=entry.buf.pinned)
                event = torch.cuda.Event()
                event.record(stream)
            entry.event = event
        else:
            tensor = host.clone()
        # The next copy into this buffer is queued on the same side stream, after this one: safe to reuse.
        self.pool.release(entry.slot, entry.buf)
        entry.buf, entry.tensor, entry.where = None, tensor, "loading"

    def load(self, token: _Token) -> torch.Tensor | None:
        """The offloaded input of ``token`` on its device (None when it was kept); prefetches the next."""
        entry = token.entry
        with self._lock:
            self._start_load(entry)
            keys = list(self._live)
            try:
                index = keys.index(id(entry))
            except ValueError:
                index = len(keys)
            ahead = 0
            for key in reversed(keys[:index]):  # the entries backward reaches next
                if ahead >= self.config.prefetch:
                    break
                other = self._live.get(key)
                if other is not None and other.where != "device":
                    self._start_load(other)
                    ahead += 1
            self._live.pop(id(entry), None)
        token.done = True
        tensor, event = entry.tensor, entry.event
        entry.tensor = entry.event = None
        if event is not None:
            torch.cuda.current_stream(entry.device).wait_event(event)
        return tensor

    def discard(self, entry: _Entry) -> None:
        with self._lock:
            self._live.pop(id(entry), None)
            if entry.buf is not None:
                self.pool.release(entry.slot, entry.buf)
            entry.buf = entry.tensor = entry.event = None

    def close(self) -> None:
        with self._lock:
            for entry in list(self._live.values()):
                entry.buf = entry.tensor = entry.event = None
            self._live.clear()
            self.pool.close()
        self._streams.clear()


# -- the checkpoint function ---------------------------------------------------------------------------

@dataclass
class LayerPlan:
    offloader: Offloader
    slot: int  # index among the checkpointed layers
    keep: bool  # one of the last k layers: input stays on the GPU


def _device_types(x: torch.Tensor) -> list[str]:
    return ["cpu"] if x.device.type == "cpu" else ["cpu", x.device.type]


def _autocast_state(x: torch.Tensor) -> list[tuple[str, bool, torch.dtype]]:
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _device_types(x)]


class _OffloadedCheckpoint(torch.autograd.Function):
    """Runs ``run(x)`` without a graph; in backward, gets ``x`` back and recomputes with one.

    The layer's trainable parameters are inputs of this function, so their gradients are returned
    through autograd like any other (no reentrant ``.grad`` writes) and LoRA needs no input grads.
    With ``accumulate`` (FSDP2: the parameters the recompute uses are the unsharded ones FSDP swaps in
    during it, not the sharded ones seen when the layer is called) the recompute's backward instead
    accumulates into the ``.grad`` of whatever leaves it used, as reentrant checkpointing does, and FSDP's
    own hooks reduce-scatter them; ``params`` is then one empty anchor that keeps the graph alive.
    """

    @staticmethod
    def forward(ctx: Any, run: Callable[[torch.Tensor], Any], plan: LayerPlan, accumulate: bool, x: torch.Tensor,
                *params: torch.Tensor) -> Any:
        ctx.set_materialize_grads(False)
        ctx.run, ctx.plan, ctx.params, ctx.accumulate = run, plan, params, accumulate
        ctx.autocast = _autocast_state(x)
        ctx.autocast_cache = torch.is_autocast_cache_enabled()
        ctx.rng = None
        if plan.offloader.config.preserve_rng_state:  # dropout must draw the same masks in the recompute
            ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
        ctx.token = plan.offloader.save(x, plan.slot, plan.keep)  # copy starts before the layer runs
        if ctx.token.entry.where == "device":
            ctx.save_for_backward(x)
        return run(x)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> tuple[Any, ...]:
        loaded = ctx.plan.offloader.load(ctx.token)
        x = loaded if loaded is not None else ctx.saved_tensors[0]
        need_x = ctx.needs_input_grad[3]
        x = x.detach().requires_grad_(need_x)
        with ExitStack() as stack:
            if ctx.rng is not None:
                devices = [x.device] if x.is_cuda else []
                stack.enter_context(torch.random.fork_rng(devices=devices))
                torch.set_rng_state(ctx.rng[0])
                if ctx.rng[1] is not None:
                    torch.cuda.set_rng_state(ctx.rng[1], x.device)
            for device_type, enabled, dtype in ctx.autocast:  # backward runs outside the trainer's autocast
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled,
                                                   cache_enabled=ctx.autocast_cache))
            with torch.enable_grad():
                out = ctx.run(x)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if ctx.accumulate:
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            ctx.run = ctx.params = None
            return (None, None, None, x.grad if need_x else None, *[None] * len(ctx.needs_input_grad[4:]))
        wanted = ([x] if need_x else []) + [p for p, need in zip(ctx.params, ctx.needs_input_grad[4:]) if need]
        grads: Iterable[Any] = [None] * len(wanted)
        if pairs and wanted:
            grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
        it = iter(grads)
        x_grad = next(it) if need_x else None
        param_grads = [next(it) if need else None for need in ctx.needs_input_grad[4:]]
        ctx.run = ctx.params = None  # drop the closure (masks, position embeddings) early
        return (None, None, None, x_grad, *param_grads)


class _TiledMLP(torch.autograd.Function):
    """A token-wise MLP run in sequence chunks, each recomputed in backward: only its input is kept.

    Used inside the layer recompute (``mlp_chunks``): the MLP's intermediate activations, the largest
    part of a layer's (4 x intermediate_size per token), then exist for one chunk at a time.
    """

    @staticmethod
    def forward(ctx: Any, fn: Callable[[torch.Tensor], torch.Tensor], chunks: int, x: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.chunks, ctx.params = fn, chunks, params
        ctx.autocast = _autocast_state(x)  # backward runs after the recompute's autocast has exited
        ctx.autocast_cache = torch.is_autocast_cache_enabled()
        ctx.save_for_backward(x)
        return torch.cat([fn(part) for part in x.chunk(chunks, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[2]
        params = [p for p, need in zip(ctx.params, ctx.needs_input_grad[3:]) if need]
        x_grad = torch.empty_like(x) if need_x else None
        sums: list[Any] = [None] * len(params)
        for part, g_part, out_part in zip(x.chunk(ctx.chunks, dim=-2), grad.chunk(ctx.chunks, dim=-2),
                                          x_grad.chunk(ctx.chunks, dim=-2) if need_x else [None] * ctx.chunks):
            part = part.detach().requires_grad_(need_x)
            with ExitStack() as stack:
                for device_type, enabled, dtype in ctx.autocast:
                    stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled,
                                                       cache_enabled=ctx.autocast_cache))
                with torch.enable_grad():
                    y = ctx.fn(part)
            grads = torch.autograd.grad(y, ([part] if need_x else []) + params, g_part, allow_unused=True)
            if need_x:
                out_part.copy_(grads[0])
                grads = grads[1:]
            sums = [g if s is None else (s if g is None else s + g) for s, g in zip(sums, grads)]
        it = iter(sums)
        return (None, None, x_grad, *[next(it) if need else None for need in ctx.needs_input_grad[3:]])


# An untiled MLP's recompute + backward holds about this many [tokens, intermediate] tensors at its peak:
# gate, up, act(gate) and their product saved, then the product's, act's and up's gradients.
_MLP_WORKING_SET = 7
_MAX_AUTO_CHUNKS = 32


def auto_mlp_chunks(need_bytes: int, headroom_bytes: int) -> int:
    """How many chunks ``mlp_chunks="auto"`` uses: none (1) while the MLP's working set takes at most half
    the memory still allowed, else enough that one chunk's share stays within a quarter of it."""
    if need_bytes <= headroom_bytes // 2:
        return 1
    if headroom_bytes <= 0:
        return _MAX_AUTO_CHUNKS
    return min(_MAX_AUTO_CHUNKS, max(2, -(-4 * need_bytes // headroom_bytes)))


def cuda_headroom(device: torch.device, enough: int | None = None) -> int:
    """Bytes this process may still allocate on ``device``: the device's free memory plus the cache, and
    within ``torch.cuda.set_per_process_memory_fraction``'s cap when one is set. No device sync.
    With ``enough``, the driver's free memory is returned as soon as it alone is ``enough`` (uncapped):
    the allocator's statistics cost ~350 us of host time a call (fused_ce_probe_gaps_h200.json)."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _d: 1.0)(device)
    if enough is not None and fraction >= 1.0 and free >= enough:
        return int(free)
    allocated = torch.cuda.memory_allocated(device)
    return int(min(free + torch.cuda.memory_reserved(device) - allocated, total * fraction - allocated))


def _mlp_width(mlp: torch.nn.Module) -> int:
    width = getattr(mlp, "intermediate_size", None)
    if isinstance(width, int):
        return width
    return max((m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)), default=0)


def make_tiled_forward(mlp: torch.nn.Module, chunks: int | str) -> Callable[..., Any]:
    """An instance ``forward`` for a token-wise MLP that runs it through :class:`_TiledMLP` when a graph
    is being built (the recompute), and as is otherwise. ``chunks="auto"`` tiles only a CUDA recompute
    whose MLP working set would not fit comfortably in the memory still allowed (so it costs nothing
    while memory is plentiful, and buys the longest contexts when it is not)."""
    inner = mlp.__dict__.get("forward") or functools.partial(type(mlp).forward, mlp)
    width = _mlp_width(mlp)

    def tiled_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or not torch.is_grad_enabled() or x.dim() < 2:
            return inner(x, *args, **kwargs)
        n = chunks
        if n == "auto":
            if not x.is_cuda or not width:
                return inner(x)
            elem = 2 if torch.is_autocast_enabled("cuda") else x.element_size()
            need = x[..., 0].numel() * width * elem * _MLP_WORKING_SET
            n = auto_mlp_chunks(need, cuda_headroom(x.device, enough=2 * need))
        params = [p for p in mlp.parameters() if p.requires_grad]
        if n < 2 or x.shape[-2] < 2 * n or not (x.requires_grad or params):
            return inner(x)
        return _TiledMLP.apply(inner, n, x, *params)

    return tiled_forward


def _requires_grad_anywhere(values: Iterable[Any], depth: int = 2) -> bool:
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.requires_grad:
                return True
        elif depth and isinstance(v, (tuple, list)):
            if _requires_grad_anywhere(v, depth - 1):
                return True
        elif depth and isinstance(v, dict):
            if _requires_grad_anywhere(v.values(), depth - 1):
                return True
    return False


def make_checkpoint_fn(layer: torch.nn.Module, plan: LayerPlan) -> Callable[..., Any]:
    """The ``_gradient_checkpointing_func`` for one layer.

    transformers calls it as ``fn(partial(forward, layer, **kwargs), *args)`` with the hidden states
    first. Inputs it cannot offload exactly (a graph-carrying tensor besides the hidden states, which
    would need its own gradient) get torch's non-reentrant checkpoint instead, still exact.
    """

    def smart_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # older transformers call us under no_grad too: no backward to serve
            return function(*args, **kwargs)
        x = args[0] if args else None
        keywords = function.keywords.values() if isinstance(function, functools.partial) else ()
        if (not isinstance(x, torch.Tensor) or not x.is_floating_point()
                or _requires_grad_anywhere((*args[1:], *kwargs.values(), *keywords))):
            plan.offloader.counters["plain_calls"] += 1
            return torch_checkpoint(function, *args, use_reentrant=False,
                                    preserve_rng_state=plan.offloader.config.preserve_rng_state, **kwargs)
        params = [p for p in layer.parameters() if p.requires_grad]  # per call: PEFT may add adapters later
        if not x.requires_grad and not params:
            return function(*args, **kwargs)  # nothing to differentiate: no checkpoint needed
        rest = args[1:]

        def run(h: torch.Tensor) -> Any:
            return function(h, *rest, **kwargs)

        # an FSDP2 unit, or parameters sharded by an enclosing one: the recompute will use others
        if is_fsdp_module(layer) or any(is_dtensor(p) for p in params):
            plan.offloader.counters["fsdp_calls"] += 1
            anchor = torch.empty(0, device=x.device, requires_grad=True)
            return _OffloadedCheckpoint.apply(run, plan, True, x, anchor)
        return _OffloadedCheckpoint.apply(run, plan, False, x, *params)

    smart_checkpoint.__qualname__ = f"smart_checkpoint[{plan.slot}]"
    return smart_checkpoint
