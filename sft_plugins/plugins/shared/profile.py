"""``torch.profiler`` ranges that name the plugins' work in a profile, and cost nothing when no profiler runs."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext


def profile_range(name: str) -> AbstractContextManager[object]:
    """A ``record_function`` range ``name`` while a profiler records, else a no-op: an unwatched range still
    costs a few microseconds of host time, and the LoRA projections open hundreds a step."""
    import torch

    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return nullcontext()
