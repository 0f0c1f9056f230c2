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


@pytest.fixture(scope="session")
def local_model_and_chat(tmp_path_factory):
    """A model folder (tiny Llama + tokenizer, save_pretrained) and a chat-``messages`` jsonl on disk, as a
    user of ``sft-plugins train`` / ``ablate --config`` has them: ``(model_dir, jsonl_path)``."""
    import json

    from sft_plugins.embedded import build_model, build_tokenizer, records

    root = tmp_path_factory.mktemp("local_run")
    tokenizer = build_tokenizer()
    build_model(tokenizer=tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(root / "chat.jsonl", "w") as f:
        for r in records(48, form="conversational", max_words=24):
            f.write(json.dumps(r) + "\n")
    return root / "model", root / "chat.jsonl"
