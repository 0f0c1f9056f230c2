"""Where the Triton kernels run: one rule for every kernel module."""

from __future__ import annotations

import os

import torch


def triton_runs_on(device: torch.device) -> bool:
    """CUDA tensors, and CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, which Triton reads
    when a kernel is decorated: it must be set before the kernel modules are imported)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")
