"""Host memory for checkpointed layer inputs: a budgeted pool of (pinned) buffers and the offloader that
copies inputs out on a side stream and back one layer ahead (``smart_checkpointing``).

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

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

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
                             fallback_bytes=0, plain_calls=0, fsdp_calls=0, unchecked_calls=0, max_tokens=0)

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
