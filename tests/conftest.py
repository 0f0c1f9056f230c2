"""Test-wide setup.

Triton reads TRITON_INTERPRET when a ``@triton.jit`` decorator runs, so it must be set before any
kernel module is imported. Without CUDA, kernels run through the Triton interpreter on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
