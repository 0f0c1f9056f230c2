"""Where the Triton kernels run (one rule for every kernel module), and every environment variable the
kernels read, in one place. Variables are read at call time, so a benchmark may set them per run."""

from __future__ import annotations

import os

import torch

# SFT_PLUGINS_CE_<NAME>: (default, meaning). Tuning and diagnosis knobs of the fused cross-entropy; the
# defaults are what docs/fused_ce_notes.md measured best.
CE_SETTINGS: dict[str, tuple[str, str]] = {
    "BACKEND": ("auto", "auto | triton | torch: the backend when the caller names none"),
    "WORKSPACE_MB": ("", "cap of the chunk workspace in MiB (empty: from the device's free memory)"),
    "DW_ACCUM": ("auto", "auto | fp32 | native: dtype in which dW is accumulated over chunks"),
    "DH_SPLIT": ("1", "split-K factor of the dH GEMM, or auto (cuBLAS's own choice was as fast: 1)"),
    "ONE_PASS": ("1", "1: the one-pass row kernel where it applies; 0: always two passes"),
    "TUNE": ("1", "1: the one-pass row kernel picks its (BLOCK_V, warps) on CUDA by timing them once per row shape"),
    "BLOCK_V": ("0", "vocabulary block of a row program (0: per-kernel default; set: no run-time choice)"),
    "NUM_WARPS": ("0", "warps of a row program (0: per-kernel default)"),
    "PROGRAMS_PER_SM": ("0", "cap the row grid at this many programs per SM (0: one program per row)"),
    "TANH": ("1", "1: hardware tanh for softcap in bf16/fp16 (below their rounding); 0: exact"),
    "REVERSE": ("", "1/0: the second pass walks the row backwards (empty: yes without softcap, no with it)"),
}


def ce_setting(name: str) -> str:
    """``SFT_PLUGINS_CE_<name>`` from the environment, or its default from :data:`CE_SETTINGS`."""
    default, _ = CE_SETTINGS[name]
    return os.environ.get(f"SFT_PLUGINS_CE_{name}", default)


def triton_interpret() -> bool:
    """Triton's interpreter is on (``TRITON_INTERPRET=1``: kernels run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """CUDA tensors, and CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, which Triton reads
    when a kernel is decorated: it must be set before the kernel modules are imported)."""
    return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
