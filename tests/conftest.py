"""Test-wide setup.

Triton reads TRITON_INTERPRET when a ``@triton.jit`` decorator runs, so it must be set before any
kernel module is imported. Without CUDA, kernels run through the Triton interpreter on CPU tensors.

Layout: core tests at this level, ``plugins/<plugin>/`` mirrors ``sft_plugins/plugins/<plugin>/``,
``kernels/`` tests ``sft_plugins.kernels``, ``distributed/`` holds the scripts the launcher tests run.
``tests`` and ``tests/plugins/**`` are packages (``__init__.py``), so files in different plugin folders may
share a basename (``plugins/fused_ce/test_patch.py``, ``plugins/smart_checkpointing/test_patch.py``).
``kernels/`` is deliberately not one (its basenames are unique): test_ablate.py puts this folder on
``sys.path``, where a ``kernels`` package would shadow the ``kernels`` distribution transformers imports.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def tok():
    """The embedded tiny tokenizer, one per test module (a trainer may adjust the one it is given)."""
    from sft_plugins.embedded import build_tokenizer

    return build_tokenizer()
