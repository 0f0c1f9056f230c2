"""smart_checkpointing: exactness against no checkpointing (losses and gradients, with dropout, full and LoRA),
through the host pool, plain, on demand, with two graphs alive, and torch's checkpoint as the fallback."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

import sft_plugins
from sft_plugins.plugins import smart_checkpointing as sc

from .helpers import NAME, assert_same, make_model, needs_cuda, run

pytestmark = pytest.mark.usefixtures("one_thread")


# -- listing ----------------------------------------------------------------------------------------

def test_module_import_does_not_import_torch():
    code = ("import sys, sft_plugins.plugins.smart_checkpointing as m; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(m.sft_describe(options={}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "loss_parity" in out.stdout


def test_describe_and_discovery():
    info = sft_plugins.available()[NAME]
    assert info.ok and info.loss_parity == 1e-5 and "host" in info.summary
    assert {o.name for o in info.options} >= {"offload", "host_budget_gb", "mlp_chunks", "lean_mlp", "lean_norm"}


# -- exactness --------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_parity_20_steps_offloaded(tok, lora):
    stats: dict = {}
    base = run(tok, lora=lora, dropout=0.1)
    ours = run(tok, {"offload": "always", "keep_last_on_gpu": 1}, lora=lora, dropout=0.1, collect=stats)
    assert_same(base, ours)
    assert stats["calls"] == 20 * 3 and stats["plain_calls"] == 0
    assert stats["host_bytes"] == 2 * stats["kept_bytes"]  # 2 of 3 layers offloaded, the last kept
    assert stats["live"] == 0


def test_parity_plain_checkpointing_without_cuda(tok):
    """offload="never" (and "auto" without CUDA) is plain checkpointing through the same function."""
    stats: dict = {}
    assert_same(run(tok, lora=True, steps=5), run(tok, {"offload": "never"}, lora=True, steps=5, collect=stats))
    assert stats["calls"] == 15 and stats["host_bytes"] == 0 and stats["kept_bytes"] == stats["saved_bytes"]


def test_parity_on_demand_without_prefetch(tok):
    stats: dict = {}
    opts = {"offload": "always", "prefetch": 0, "keep_last_on_gpu": 0}
    assert_same(run(tok, steps=4), run(tok, opts, steps=4, collect=stats))
    assert stats["offloaded_fraction"] == 1.0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_parity_with_chunked_mlp_recompute(tok, lora):
    stats: dict = {}
    opts = {"offload": "always", "prefetch": 0, "keep_last_on_gpu": 0, "mlp_chunks": 3}
    assert_same(run(tok, lora=lora, dropout=0.1, steps=6),
                run(tok, opts, lora=lora, dropout=0.1, steps=6, collect=stats))
    assert stats["calls"] == 18


def test_two_forwards_before_one_backward(tok):
    def once(options):
        model = make_model(tok, layers=2)
        stack = sft_plugins.compose([NAME], options={NAME: options}) if options is not None else None
        if stack:
            stack.prepare(model=model)
        ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(3))
        loss = model(input_ids=ids, labels=ids).loss + 0.5 * model(input_ids=ids.flip(1), labels=ids).loss
        loss.backward()
        out = ([loss.item()], {n: p.grad.clone() for n, p in model.named_parameters()})
        if stack:
            assert sc.stats(model)["allocations"] == 4  # a second buffer per layer while both graphs live
            stack.undo()
        return out

    assert_same(once(None), once({"offload": "always", "keep_last_on_gpu": 0}))


def test_graph_carrying_side_input_uses_torch_checkpoint():
    """A tensor needing its own gradient besides the hidden states falls back to torch's checkpoint."""
    from sft_plugins.plugins.smart_checkpointing.checkpoint import LayerPlan, make_checkpoint_fn
    from sft_plugins.plugins.smart_checkpointing.offload import OffloadConfig, Offloader

    layer = torch.nn.Linear(4, 4)
    cfg = OffloadConfig(mode="copy", host_budget=1 << 20, overflow="gpu", pageable_budget=0, host_reserve=0)
    off = Offloader(cfg)
    fn = make_checkpoint_fn(layer, LayerPlan(off, 0, keep=False))
    x = torch.randn(3, 4, requires_grad=True)
    scale = torch.randn(4, requires_grad=True)

    def forward(h, scale):
        return layer(h) * scale

    fn(functools.partial(forward, scale=scale), x).sum().backward()
    got = (x.grad.clone(), scale.grad.clone(), layer.weight.grad.clone())
    x.grad = scale.grad = layer.weight.grad = None
    forward(x, scale).sum().backward()
    for a, b in zip(got, (x.grad, scale.grad, layer.weight.grad)):
        torch.testing.assert_close(a, b)
    assert off.counters["plain_calls"] == 1


# -- GPU: the real offload path ---------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gpu_parity_and_offloaded_fraction(tok, lora):
    stats: dict = {}
    base = run(tok, lora=lora, dropout=0.1, layers=4, device="cuda")
    ours = run(tok, {}, lora=lora, dropout=0.1, layers=4, device="cuda", collect=stats)
    assert_same(base, ours, tol=1e-5)
    assert stats["offloaded_fraction"] == pytest.approx(3 / 4)  # all but the last layer
    assert stats["fallback_bytes"] == 0 and stats["live"] == 0
    assert stats["allocations"] <= 3 * 3  # one buffer per layer, grown at most at a few powers of two


@needs_cuda
def test_gpu_lean_setting_is_exact(tok):
    """Everything offloaded, fetched on demand, MLP recomputed in chunks: still the baseline's numbers."""
    stats: dict = {}
    opts = {"prefetch": 0, "keep_last_on_gpu": 0, "mlp_chunks": 2}
    assert_same(run(tok, lora=True, layers=3, steps=6, device="cuda"),
                run(tok, opts, lora=True, layers=3, steps=6, device="cuda", collect=stats))
    assert stats["offloaded_fraction"] == 1.0
