"""Fixtures shared by the built-in plugins' tests (``tests/plugins/<plugin>/``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: tiny tensors (and bitsandbytes' many small CPU ops) on a shared
    2-core machine otherwise wait at a barrier for a busy core (measured 3-10x slower under load).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
