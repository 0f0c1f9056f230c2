"""Attention over packed rows (several sequences in one row) that never crosses a sequence boundary
and never builds a dense ``T x T`` mask.

Registered through transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` under one name
per backend (:func:`impl_name`, e.g. ``sft_packed_varlen``), so two models (two stacks) in one process
can use different backends; the padding_free plugin switches a model to it with
``model.set_attn_implementation`` and switches back on undo. Backends:

- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's flash-attention varlen kernel;
  CUDA, fp16/bf16). Its keywords changed between releases (2.11 has no ``is_causal``; causality is
  ``window_size=(-1, 0)``), so they are chosen from its signature at run time.
- ``flex``: FlexAttention with a document-causal block mask built once per forward (CUDA; any float).
- ``loop``: one causal ``scaled_dot_product_attention`` per sequence (any device, any dtype): slower
  than the kernels above, but exact and O(sum of len^2) instead of O(T^2). Used by the CPU tests.

Sequence boundaries come from ``cu_seq_lens_q`` / ``max_length_q`` (our collator supplies them, so no
device-to-host sync happens per layer) or, failing that, from ``position_ids`` restarts. A call with an
attention mask (a padded batch, e.g. from another collator) or with a KV cache goes to sdpa unchanged.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections import Counter
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..shared import PACKED_IMPL_PREFIX

BACKENDS = ("varlen", "flex", "loop")

# What this machine can run, learnt on a kernel's first call (a fact about torch and the GPU, not
# about any run): backend -> None when it worked, else the error that made us fall back.
KERNEL_PROBES: dict[str, str | None] = {}


# transformers' attention registry is process-global, so the count of installed models using each of our
# entries is too (it only decides when an entry can be removed; no run reads it).
_REGISTRY_USERS: Counter[str] = Counter()


SDPA_CALLS_ATTR = "sft_packed_sdpa_calls"  # per attention layer: calls that were not packed rows


def sdpa_calls(model: Any) -> int:
    """How many attention calls of ``model`` went to plain sdpa (padded batches, KV caches) since install."""
    return sum(vars(m).get(SDPA_CALLS_ATTR, 0) for m in model.modules())


def impl_name(backend: str) -> str:
    """The attention-implementation name a model is switched to for ``backend``."""
    return f"{PACKED_IMPL_PREFIX}_{backend}"


def varlen_available() -> bool:
    """``varlen_attn`` exists and can be made causal (``is_causal`` or ``window_size`` keyword)."""
    try:
        _, params = _varlen_kwargs()
    except ImportError:
        return False
    return "is_causal" in params or "window_size" in params


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# -- sequence boundaries, computed once per forward and shared by all layers ----------------------
class _PerForward:
    """Remembers one value per input tensor object (weakly), so the 16+ layers of a forward (and the
    recompute of checkpointing) derive boundaries, masks and lists once, not once per layer."""

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._value: Any = None

    def get(self, key: torch.Tensor, make: Callable[[], Any]) -> Any:
        if self._ref is not None and self._ref() is key:
            return self._value
        value = make()
        self._ref, self._value = weakref.ref(key), value
        return value


_cu_from_pos = _PerForward()
_cu_list = _PerForward()
_flex_mask = _PerForward()


def cu_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sequence starts of the flattened ``[B, T]`` batch: a new sequence wherever the position does
    not follow its predecessor by one (transformers' own packed-sequence rule) and at every row start."""
    b, t = position_ids.shape
    flat = position_ids.reshape(-1)
    new = torch.ones_like(flat, dtype=torch.bool)
    new[1:] = flat[1:] != flat[:-1] + 1
    new[::t] = True
    starts = new.nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([b * t])]).to(torch.int32)
    return cu, int(cu.diff().max())


def _bounds(kwargs: dict[str, Any], b: int, t: int, device: torch.device) -> tuple[torch.Tensor, int]:
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and b == 1 and int(cu.numel()) >= 2:
        ml = kwargs.get("max_length_q")
        if ml is None:
            ml = _cu_list.get(cu, lambda: int(cu.diff().max()))
        return cu.to(device=device, dtype=torch.int32), int(ml)
    pos = kwargs.get("position_ids")
    if pos is None:  # no boundaries given: each row is one sequence
        cu = torch.arange(0, (b + 1) * t, t, device=device, dtype=torch.int32)
        return cu, t
    pos = pos.expand(b, -1) if pos.shape[0] != b else pos
    return _cu_from_pos.get(pos, lambda: cu_from_position_ids(pos))


# -- the three backends; q/k/v come as [B, H, T, D], the result goes back as [B, T, H, D] ----------
@functools.lru_cache(maxsize=1)
def _varlen_kwargs() -> tuple[Callable, frozenset[str]]:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_has_window() -> bool:
    """This torch's ``varlen_attn`` takes ``window_size`` (sliding windows)."""
    return "window_size" in _varlen_kwargs()[1]


def _run_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, ml: int,
                scaling: float | None, window: int | None = None) -> torch.Tensor:
    fn, params = _varlen_kwargs()
    b, hq, t, d = q.shape
    hk = k.shape[1]
    qf = q.transpose(1, 2).reshape(b * t, hq, d)
    kf = k.transpose(1, 2).reshape(b * t, hk, d)
    vf = v.transpose(1, 2).reshape(b * t, hk, d)
    kw: dict[str, Any] = {}
    if window is not None:  # _attend routes a window here only when window_size exists
        kw["window_size"] = (window - 1, 0)  # keys j with i - window < j <= i, as transformers' sliding mask
    elif "is_causal" in params:
        kw["is_causal"] = True
    else:  # varlen_available() made sure one of the two exists
        kw["window_size"] = (-1, 0)  # (left unbounded, right 0) = causal, per varlen_attn's docstring
    if scaling is not None:
        if "scale" in params:
            kw["scale"] = scaling
        elif abs(scaling - d ** -0.5) > 1e-6 * d ** -0.5:
            raise RuntimeError("this torch's varlen_attn takes no scale; the model needs a non-default one: "
                               "use the padding_free option attention='flex'")
    if hk != hq:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:  # older signature: give every query head its own K/V copy
            kf = kf.repeat_interleave(hq // hk, dim=1)
            vf = vf.repeat_interleave(hq // hk, dim=1)
    out = fn(qf, kf, vf, cu, cu, ml, ml, **kw)
    return out.reshape(b, t, hq, d)


_compiled_flex: dict[str, Callable] = {}


def _run_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
              scaling: float | None, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, hq, t, d = q.shape
    total = b * t

    def make_mask():
        doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=q.device, dtype=torch.int32),
                                      cu.diff().to(q.device))

        def doc_causal(bb, hh, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)

        def doc_causal_window(bb, hh, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki) & (qi - ki < window)

        # compiled on CUDA: the eager builder evaluates the mask densely (T x T), which is what we avoid
        return create_block_mask(doc_causal if window is None else doc_causal_window, None, None, total, total,
                                 device=q.device, _compile=q.is_cuda)

    masks = _flex_mask.get(cu, dict)  # one block mask per window size (Gemma alternates local/global layers)
    block_mask = masks.get(window)
    if block_mask is None:
        block_mask = masks[window] = make_mask()
    score_mod = None
    if softcap:
        def score_mod(score, bb, hh, qi, ki):  # Gemma-2's logit softcap, on the scaled scores
            return softcap * torch.tanh(score / softcap)
    if q.is_cuda:
        fn = _compiled_flex.get("fn")
        if fn is None:  # compiled once; shapes vary per batch, so let dynamo go dynamic after a change
            fn = _compiled_flex["fn"] = torch.compile(flex_attention)
    else:
        fn = flex_attention  # eager reference path: slow, used only to check the mask logic on CPU
    qf = q.transpose(1, 2).reshape(1, total, hq, d).transpose(1, 2)
    kf = k.transpose(1, 2).reshape(1, total, k.shape[1], d).transpose(1, 2)
    vf = v.transpose(1, 2).reshape(1, total, k.shape[1], d).transpose(1, 2)
    out = fn(qf, kf, vf, block_mask=block_mask, score_mod=score_mod, scale=scaling, enable_gqa=k.shape[1] != hq)
    return out.transpose(1, 2).reshape(b, t, hq, d)


def _sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None,
                        window: int | None, softcap: float | None) -> torch.Tensor:
    """Causal attention of one sequence, ``[H, L, D]``; eager math where sdpa cannot express the softcap."""
    if softcap is None and window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    pos = torch.arange(q.shape[1], device=q.device)
    keep = pos[:, None] >= pos[None, :]
    if window is not None:
        keep &= pos[:, None] - pos[None, :] < window  # transformers' sliding window: i - window < j <= i
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scaling)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)  # as Gemma-2's eager attention
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _run_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
              scaling: float | None, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    b, hq, t, d = q.shape
    hk = k.shape[1]
    bounds = _cu_list.get(cu, lambda: cu.tolist())
    qf = q.transpose(1, 2).reshape(b * t, hq, d).transpose(0, 1)  # [H, N, D]
    kf = k.transpose(1, 2).reshape(b * t, hk, d).transpose(0, 1)
    vf = v.transpose(1, 2).reshape(b * t, hk, d).transpose(0, 1)
    if hk != hq:
        kf = kf.repeat_interleave(hq // hk, dim=0)
        vf = vf.repeat_interleave(hq // hk, dim=0)
    outs = [_sequence_attention(qf[:, s:e], kf[:, s:e], vf[:, s:e], scaling, window, softcap)
            for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(outs, dim=1).transpose(0, 1).reshape(b, t, hq, d)


def _attend(backend: str, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``[B, H, T, D]`` in, ``([B, T, H, D], None)`` out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or key.shape[2] != query.shape[2]:
        # a padded batch or a KV cache: not a packed row; sdpa with the mask transformers built is right.
        # Counted on the layer (diagnostics for benchmarks; removed by install()'s undo).
        vars(module)[SDPA_CALLS_ATTR] = vars(module).get(SDPA_CALLS_ATTR, 0) + 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if dropout and module.training:
        raise RuntimeError("sft_packed attention does not implement attention dropout; set the model's "
                           "attention_dropout=0 or use the padding_free option attention='dense'")
    b, _, t, _ = query.shape
    cu, ml = _bounds(kwargs, b, t, query.device)
    # A window at least as long as the longest sequence of the row masks nothing: no window at all
    window = kwargs.get("sliding_window")
    window = int(window) if window and int(window) < ml else None
    softcap = kwargs.get("softcap") or None
    if backend == "varlen" and not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)):
        backend = "flex" if query.is_cuda else "loop"  # the flash kernel needs CUDA and fp16/bf16
    if backend == "varlen" and (softcap or (window and not varlen_has_window())):
        backend = "flex"  # the flash varlen kernel has no softcap (nor, in older torch, a window)
    if backend == "flex" and not (query.is_cuda or flex_available()):
        backend = "loop"
    while backend in ("varlen", "flex") and KERNEL_PROBES.get(backend):
        backend = "flex" if backend == "varlen" and query.is_cuda and flex_available() else "loop"
    if backend in ("varlen", "flex") and backend not in KERNEL_PROBES:
        # First call of a kernel on this machine: if it cannot run here (an older torch, an unsupported
        # GPU), say so once and take the next exact path instead of failing the run.
        try:
            out = _run_varlen(query, key, value, cu, ml, scaling, window) if backend == "varlen" else \
                _run_flex(query, key, value, cu, scaling, window, softcap)
            KERNEL_PROBES[backend] = None
            return out, None
        except (RuntimeError, TypeError, NotImplementedError, ValueError) as exc:
            KERNEL_PROBES[backend] = f"{type(exc).__name__}: {exc}"[:500]
            warnings.warn(f"sft_packed: {backend} attention failed here ({KERNEL_PROBES[backend]}); "
                          "falling back to an exact, possibly slower path", stacklevel=2)
            return _attend(backend, module, query, key, value, None, dropout, scaling, **kwargs)
    if backend == "varlen":
        out = _run_varlen(query, key, value, cu, ml, scaling, window)
    elif backend == "flex":
        out = _run_flex(query, key, value, cu, scaling, window, softcap)
    else:
        out = _run_loop(query, key, value, cu, scaling, window, softcap)
    return out, None


@functools.cache
def attention_function(backend: str) -> Callable[..., tuple[torch.Tensor, None]]:
    """The attention function registered under :func:`impl_name` for ``backend`` (one object per backend,
    so unregistering removes only our own entry)."""
    fn = functools.partial(_attend, backend)
    functools.update_wrapper(fn, _attend)
    return fn


def packed_mask(**kwargs: Any) -> Any:
    """Mask builder of our implementations (:func:`impl_name`): no mask at all for packed or unpadded rows
    (the attention takes boundaries from ``cu_seq_lens``/``position_ids``); sdpa's mask for padded batches or
    caches.

    Keyword-only and forwarded untouched, because transformers changed these arguments between
    releases (5.2x: ``q_length``/``q_offset``; earlier: ``cache_position``)."""
    from transformers.masking_utils import sdpa_mask

    q_length = kwargs.get("q_length")
    if q_length is None and kwargs.get("cache_position") is not None:
        q_length = int(kwargs["cache_position"].shape[0])
    no_cache = q_length is not None and q_length == kwargs.get("kv_length") and not kwargs.get("kv_offset") \
        and not kwargs.get("q_offset")
    if kwargs.get("attention_mask") is None and no_cache:
        return None
    return sdpa_mask(**kwargs)


def register(backend: str) -> None:
    """Add :func:`impl_name` of ``backend`` to transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(impl_name(backend), attention_function(backend))
    AttentionMaskInterface.register(impl_name(backend), packed_mask)


def unregister(backend: str) -> None:
    """Remove :func:`impl_name` of ``backend`` from the registries (only our own entries)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = impl_name(backend)
    for registry, fn in ((AttentionInterface, attention_function(backend)), (AttentionMaskInterface, packed_mask)):
        if registry._global_mapping.get(name) is fn:
            del registry._global_mapping[name]


def current_impl(model: Any) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def install(model: Any, backend: str) -> Callable[[], None]:
    """Switch ``model`` to packed attention with ``backend``; returns the undo, which switches it back and
    removes the registry entry once no installed model uses it any more."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    register(backend)
    _REGISTRY_USERS[backend] += 1
    name = impl_name(backend)
    previous = current_impl(model)

    def undo() -> None:
        if current_impl(model) == name:
            model.set_attn_implementation(previous)
        for module in model.modules():
            vars(module).pop(SDPA_CALLS_ATTR, None)
        _REGISTRY_USERS[backend] -= 1
        if _REGISTRY_USERS[backend] <= 0:
            del _REGISTRY_USERS[backend]
            unregister(backend)

    try:
        model.set_attn_implementation(name)
        if current_impl(model) != name:
            raise RuntimeError(f"{type(model).__name__} did not accept attn_implementation={name!r}")
    except Exception:
        undo()
        raise
    return undo
