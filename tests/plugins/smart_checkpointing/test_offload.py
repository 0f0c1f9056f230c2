"""smart_checkpointing's host memory: buffers reused across steps and freed with a dropped graph, the host
budget (fallback to the GPU, pageable overflow, a reserve never crossed), the no-CUDA notice, and on the GPU
pinned buffers that really take the checkpoints off the device."""

from __future__ import annotations

import warnings

import pytest
import torch

import sft_plugins
from sft_plugins.embedded import build_model
from sft_plugins.plugins import smart_checkpointing as sc
from sft_plugins.plugins.smart_checkpointing.patch import patch_of

from .helpers import CUDA, NAME, assert_same, make_model, needs_cuda, run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_no_cuda_says_so_once(tok):
    """Without CUDA, offload="auto" is plain checkpointing, and says so: a RuntimeWarning per prepare() from
    one place, which Python's default filter shows once per process."""
    if CUDA:
        pytest.skip("only meaningful without CUDA")
    with pytest.warns(RuntimeWarning, match="plain activation checkpointing"):
        run(tok, {}, steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default", RuntimeWarning)  # Python's default: once per warning location
        run(tok, {}, steps=1)
        run(tok, {}, steps=1)
    notices = [w for w in caught if "plain activation checkpointing" in str(w.message)]
    assert len(notices) == 1, [str(w.message) for w in caught]
    with sft_plugins.compose([NAME], options={NAME: {"offload": "never"}}) as stack, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # asking for plain checkpointing: nothing to say
        stack.prepare(model=make_model(tok, layers=1))


def test_buffers_reused_across_steps(tok):
    model = make_model(tok, layers=2)
    with sft_plugins.compose([NAME], options={NAME: {"offload": "always", "keep_last_on_gpu": 0}}) as stack:
        stack.prepare(model=model)
        ids = torch.randint(0, len(tok), (2, 30))
        model(input_ids=ids, labels=ids).loss.backward()
        first = sc.stats(model)
        for n in (30, 17, 25):  # no longer than the first: no new buffer
            ids = torch.randint(0, len(tok), (2, n))
            model(input_ids=ids, labels=ids).loss.backward()
        assert sc.stats(model)["allocations"] == first["allocations"] == 2
        # a graph dropped without backward gives its buffers back
        loss = model(input_ids=ids, labels=ids).loss
        assert sc.stats(model)["live"] == 2
        del loss
        assert sc.stats(model)["live"] == 0
        model(input_ids=ids, labels=ids).loss.backward()
        assert sc.stats(model)["allocations"] == 2


# -- the host budget --------------------------------------------------------------------------------

def test_tiny_budget_falls_back_to_gpu_exactly(tok):
    stats: dict = {}
    # each layer input is at most 2 x 31 x 64 fp32 = 15.9 KB -> a 16 KiB buffer: the budget holds one layer
    ours = run(tok, {"offload": "always", "keep_last_on_gpu": 0, "host_budget_gb": 20_000 / 2**30},
               collect=stats)
    assert_same(run(tok), ours)
    assert stats["host_bytes"] > 0 and stats["fallback_bytes"] > 0 and stats["pageable_bytes"] == 0
    assert stats["host_bytes_held"] <= 20_000


def test_tiny_budget_overflows_to_pageable(tok):
    stats: dict = {}
    opts = {"offload": "always", "keep_last_on_gpu": 0, "host_budget_gb": 20_000 / 2**30,
            "overflow": "pageable", "pageable_budget_gb": 20_000 / 2**30}
    assert_same(run(tok, steps=6), run(tok, opts, steps=6, collect=stats))
    assert stats["host_bytes"] > 0 and stats["pageable_bytes"] > 0 and stats["fallback_bytes"] > 0
    assert stats["pageable_bytes_held"] <= 20_000


def test_host_reserve_is_never_crossed(tok, caplog):
    stats: dict = {}
    with caplog.at_level("WARNING", logger="sft_plugins"):
        run(tok, {"offload": "always", "host_reserve_gb": 1e6}, steps=2, collect=stats)
    assert stats["allocations"] == 0 and stats["host_bytes"] == 0 and stats["fallback_bytes"] > 0
    assert "reserve" in caplog.text


# -- GPU: the real offload path ---------------------------------------------------------------------

@needs_cuda
def test_gpu_buffers_are_pinned_and_reused(tok):
    model = make_model(tok, layers=3, device="cuda")
    with sft_plugins.compose([NAME]) as stack:
        stack.prepare(model=model)
        patch = patch_of(model)
        assert patch is stack.state_of(NAME).patch
        for _ in range(5):
            ids = torch.randint(0, len(tok), (2, 64), device="cuda")
            model(input_ids=ids, labels=ids).loss.backward()
        bufs = [b for free in patch.offloader.pool._free.values() for b in free]
        assert len(bufs) == 2 and all(b.pinned and b.data.is_pinned() for b in bufs)
        assert sc.stats(model)["allocations"] == 2


@needs_cuda
def test_gpu_checkpoints_leave_the_gpu(tok):
    """GPU memory held after the decoder stack: HF checkpointing holds every layer input, ours one."""
    layers, seq, hidden = 8, 4096, 512

    def held(arm):
        model = build_model("tiny", tokenizer=tok, num_hidden_layers=layers, hidden_size=hidden,
                            intermediate_size=2 * hidden, dtype=torch.bfloat16).cuda().train()
        for p in model.parameters():
            p.requires_grad_(True)
        stack = sft_plugins.compose([NAME] if arm == "ours" else [])
        stack.prepare(model=model)
        if arm == "hf":
            model.gradient_checkpointing_enable()
        seen = {}

        def record(module, args):  # returns None: a pre-hook's return value would replace the inputs
            seen.setdefault("mem", torch.cuda.memory_allocated())

        model.model.norm.register_forward_pre_hook(record)
        ids = torch.randint(0, len(tok), (1, seq), device="cuda")
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        model(input_ids=ids, labels=ids).loss.backward()
        stack.undo()
        return seen["mem"] - start

    per_layer = seq * hidden * 2
    hf, ours = held("hf"), held("ours")
    # ours still holds the last layer's input (keep_last_on_gpu=1) and layer 0's: LlamaModel.forward keeps
    # a reference to the embeddings until it returns (that copy is freed before backward)
    assert hf - ours >= (layers - 2) * per_layer * 0.9


@needs_cuda
def test_gpu_budget_and_pageable_overflow_stay_exact(tok):
    stats: dict = {}
    opts = {"host_budget_gb": 20_000 / 2**30, "overflow": "pageable", "pageable_budget_gb": 20_000 / 2**30,
            "keep_last_on_gpu": 0}
    assert_same(run(tok, layers=4, steps=6, device="cuda"),
                run(tok, opts, layers=4, steps=6, device="cuda", collect=stats))
    assert stats["host_bytes"] and stats["pageable_bytes"] and stats["fallback_bytes"]
