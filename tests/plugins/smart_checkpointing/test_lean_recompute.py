"""smart_checkpointing's lean recompute: the fused SwiGLU MLP (``lean_mlp``), the fused RMSNorm (``lean_norm``)
and the tiled MLP (``mlp_chunks``, fixed or "auto") give the baseline's losses and gradients, are undone,
and are refused where they cannot apply; on the GPU they lower the backward peak."""

from __future__ import annotations

import pytest
import torch

import sft_plugins
from sft_plugins import PluginError
from sft_plugins.plugins.smart_checkpointing import lean_mlp, lean_norm, tiled_mlp

from .helpers import NAME, assert_same, gpu_bf16_lora_backward, make_model, needs_cuda, run, with_lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("chunks", [0, 2], ids=["whole", "chunked"])
@pytest.mark.parametrize("h_rows", [None, 1], ids=["h_default", "h_row_chunks"])
def test_parity_with_lean_mlp(tok, lora, chunks, h_rows, monkeypatch):
    """The lean SwiGLU function in the first forward and the recompute: same losses and gradients as no
    checkpointing (also with its product made in row chunks, which tiny inputs otherwise never are)."""
    if h_rows is not None:
        monkeypatch.setattr(lean_mlp, "_MIN_CHUNK_ROWS", h_rows)
        assert len(lean_mlp._row_chunks(9)) == 3 and len(lean_mlp._row_chunks(40)) == 4
    calls = []
    apply = lean_mlp._LeanSwiGLU.apply
    monkeypatch.setattr(lean_mlp._LeanSwiGLU, "apply", lambda *a: (calls.append(1), apply(*a))[1])
    opts = {"offload": "always", "lean_mlp": True, "mlp_chunks": chunks}
    assert_same(run(tok, lora=lora, dropout=0.1, steps=6), run(tok, opts, lora=lora, dropout=0.1, steps=6))
    # every layer's first forward and its recompute (each chunk's) went through it
    assert len(calls) == 6 * 3 * (1 + max(chunks, 1))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_parity_with_lean_norm(tok, lora, monkeypatch):
    """The fused RMSNorm in the recompute (with the lean MLP): same losses and gradients as no checkpointing,
    the norms' weight gradients included (full fine-tuning)."""
    calls = []
    apply = lean_norm._LeanRMSNorm.apply
    monkeypatch.setattr(lean_norm._LeanRMSNorm, "apply", lambda *a: (calls.append(1), apply(*a))[1])
    opts = {"offload": "always", "lean_mlp": True, "lean_norm": True}
    assert_same(run(tok, lora=lora, dropout=0.1, steps=6), run(tok, opts, lora=lora, dropout=0.1, steps=6))
    # two norms per layer in every recompute (the final norm is not patched), but for LoRA's first input norm:
    # nothing there needs a gradient (frozen embeddings and norm weight), so it runs as is
    assert len(calls) == 6 * (3 * 2 - lora)


def test_lean_norm_refusal_and_undo(tok):
    model = make_model(tok, layers=2)
    norms = [model.model.layers[0].input_layernorm, model.model.layers[1].post_attention_layernorm]
    with sft_plugins.compose([NAME], options={NAME: {"lean_norm": True}}) as stack:
        stack.prepare(model=model)
        assert all("forward" in n.__dict__ for n in norms) and "forward" not in model.model.norm.__dict__
    assert all("forward" not in n.__dict__ for n in norms)
    for layer in model.model.layers:
        layer.input_layernorm = layer.post_attention_layernorm = torch.nn.LayerNorm(layer.mlp.up_proj.in_features)
    with pytest.raises(PluginError, match="lean_norm needs Llama-style RMSNorms"):
        sft_plugins.compose([NAME], options={NAME: {"lean_norm": True}}).prepare(model=model)
    # a bad value is refused by the option schema when the stack is composed, before any model exists
    with pytest.raises(PluginError, match="option 'lean_norm' must be bool \\| 'auto', got 'yes'"):
        sft_plugins.compose([NAME], options={NAME: {"lean_norm": "yes"}})


def test_lean_mlp_refusals_fallback_and_undo(tok):
    from peft import LoraConfig, get_peft_model

    # LoRA dropout everywhere: nothing to fuse exactly, so the option is refused with the reason
    model = get_peft_model(make_model(tok, layers=2), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
    with pytest.raises(PluginError, match="lean_mlp needs SwiGLU.*without dropout"):
        sft_plugins.compose([NAME], options={NAME: {"lean_mlp": True}}).prepare(model=model)
    model = with_lora(make_model(tok, layers=2))
    mlp = model.base_model.model.model.layers[0].mlp
    with sft_plugins.compose([NAME], options={NAME: {"lean_mlp": True}}) as stack:
        stack.prepare(model=model)
        assert "forward" in mlp.__dict__ and lean_mlp._plan(mlp) is not None
        mlp.up_proj.lora_dropout["default"] = torch.nn.Dropout(0.1)  # changed after prepare: checked per call
        assert lean_mlp._plan(mlp) is None
    assert "forward" not in mlp.__dict__
    model = make_model(tok, layers=2)
    for layer in model.model.layers:
        layer.mlp = torch.nn.Identity()
    with pytest.raises(PluginError, match="lean_mlp needs SwiGLU"):
        sft_plugins.compose([NAME], options={NAME: {"lean_mlp": True}}).prepare(model=model)


def test_chunked_mlp_is_undone_and_refused_without_dense_mlp(tok):
    model = make_model(tok, layers=2)
    with sft_plugins.compose([NAME], options={NAME: {"mlp_chunks": 2}}) as stack:
        stack.prepare(model=model)
        assert "forward" in model.model.layers[0].mlp.__dict__
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)
    model.model.layers[1].mlp = torch.nn.Identity()
    with pytest.raises(PluginError, match="mlp_chunks"):
        sft_plugins.compose([NAME], options={NAME: {"mlp_chunks": 2}}).prepare(model=model)


def test_auto_mlp_chunks_tiles_only_when_memory_is_short():
    gib = 1 << 30
    assert tiled_mlp.auto_mlp_chunks(4 * gib, 100 * gib) == 1   # plenty: no extra MLP forward
    assert tiled_mlp.auto_mlp_chunks(4 * gib, 8 * gib) == 1     # exactly half: still untiled
    assert tiled_mlp.auto_mlp_chunks(5 * gib, 8 * gib) == 3     # each chunk's share <= a quarter of the headroom
    assert tiled_mlp.auto_mlp_chunks(4 * gib, 2 * gib) == 8
    assert tiled_mlp.auto_mlp_chunks(4 * gib, 0) == 32 and tiled_mlp.auto_mlp_chunks(400 * gib, gib) == 32


def test_auto_mlp_chunks_is_the_default_and_untiled_off_cuda(tok, monkeypatch):
    assert sft_plugins.compose([NAME]).options[NAME]["mlp_chunks"] == "auto"  # the schema's default, filled in
    calls = []
    monkeypatch.setattr(tiled_mlp._TiledMLP, "apply", lambda *a: calls.append(a))
    assert_same(run(tok, steps=2), run(tok, {"offload": "always"}, steps=2))
    assert calls == []  # CPU tensors: "auto" never tiles
    with pytest.raises(PluginError, match="option 'mlp_chunks' must be int >= 0 \\| 'auto', got 'fast'"):
        sft_plugins.compose([NAME], options={NAME: {"mlp_chunks": "fast"}})
    model = make_model(tok, layers=2)
    model.model.layers[1].mlp = torch.nn.Identity()  # no dense MLP: "auto" leaves it alone, no refusal
    with sft_plugins.compose([NAME]) as stack:
        stack.prepare(model=model)
        assert "forward" in model.model.layers[0].mlp.__dict__


# -- GPU --------------------------------------------------------------------------------------------

@needs_cuda
def test_gpu_auto_mlp_chunks_tiles_when_memory_is_short_and_stays_exact(tok, monkeypatch):
    assert tiled_mlp.auto_mlp_chunks(1, tiled_mlp.cuda_headroom(torch.device("cuda"))) == 1  # an idle GPU
    # the short cut (no allocator statistics) when the driver's free memory alone is enough
    assert tiled_mlp.cuda_headroom(torch.device("cuda"), enough=1 << 20) >= 1 << 20
    tiled = []
    apply = tiled_mlp._TiledMLP.apply
    monkeypatch.setattr(tiled_mlp, "cuda_headroom", lambda device, enough=None: 0)  # as if the GPU were full: tile
    monkeypatch.setattr(tiled_mlp._TiledMLP, "apply", lambda *a: (tiled.append(a[1]), apply(*a))[1])
    monkeypatch.setattr(tiled_mlp, "_MAX_AUTO_CHUNKS", 4)
    assert_same(run(tok, layers=3, steps=4, device="cuda"), run(tok, {}, layers=3, steps=4, device="cuda"))
    assert tiled and set(tiled) == {4}


@needs_cuda
def test_gpu_lean_mlp_bf16_lora_same_loss_less_memory(tok):
    """The lean recompute gives the same losses to bf16 rounding and a lower backward peak by several
    [tokens, intermediate] tensors (more with its product in row chunks: 4096 tokens make 4)."""
    tokens, inter, hidden = 4096, 4096, 128
    plain_losses, plain_peak = gpu_bf16_lora_backward(tok, {"lean_mlp": False}, tokens, inter, hidden)
    lean_losses, lean_peak = gpu_bf16_lora_backward(tok, {"lean_mlp": True}, tokens, inter, hidden)
    for a, b in zip(plain_losses, lean_losses):
        assert abs(a - b) <= 2e-2 * abs(a)
    unit = tokens * inter * 2  # one bf16 [tokens, intermediate] tensor
    assert plain_peak - lean_peak >= 4 * unit, (plain_peak / unit, lean_peak / unit)


@needs_cuda
def test_gpu_lean_norm_bf16_lora_same_loss_less_memory(tok):
    """The fused RMSNorm keeps no fp32 copy of its input: on top of the lean MLP, the backward peak drops by at
    least one fp32 [tokens, hidden] tensor, with the same losses to bf16 rounding."""
    tokens, inter, hidden = 4096, 1024, 1024
    mlp_losses, mlp_peak = gpu_bf16_lora_backward(tok, {"lean_mlp": True, "lean_norm": False}, tokens, inter, hidden)
    both_losses, both_peak = gpu_bf16_lora_backward(tok, {"lean_mlp": True, "lean_norm": True}, tokens, inter,
                                                    hidden)
    for a, b in zip(mlp_losses, both_losses):
        assert abs(a - b) <= 2e-2 * abs(a)
    unit = tokens * hidden * 4  # one fp32 [tokens, hidden] tensor
    assert mlp_peak - both_peak >= unit, (mlp_peak / unit, both_peak / unit)


def _down_gemms_in_recompute(monkeypatch):
    """Records each projection the lean MLP makes: True for a full down-projection GEMM (``linear`` called with
    ``out=``). A layer's first forward makes gate, up and down (False, False, True); its recompute gate and up,
    and down only where the output may be read."""
    calls = []
    linear = lean_mlp.linear
    monkeypatch.setattr(lean_mlp, "linear",
                        lambda *a, **k: (calls.append("out" in k), linear(*a, **k))[1])
    return calls


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_recompute_skips_the_mlp_output_nobody_reads(tok, lora, monkeypatch):
    """A Llama layer returns ``residual + mlp(...)``: its recompute makes the MLP's gate/up products and the
    down projection's LoRA inputs but not its output, with the same losses and gradients."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert lean_mlp._returns_residual_plus_mlp(LlamaDecoderLayer)
    calls = _down_gemms_in_recompute(monkeypatch)
    opts = {"offload": "always", "lean_mlp": True, "mlp_chunks": 0}
    assert_same(run(tok, lora=lora, dropout=0.1, steps=4), run(tok, opts, lora=lora, dropout=0.1, steps=4))
    # 3 layers x 4 steps: the first forwards' down projections only; gate and up in forwards and recomputes
    assert calls.count(True) == 3 * 4 and calls.count(False) == 2 * 2 * 3 * 4


def test_recompute_keeps_the_mlp_output_where_it_may_be_read(tok, monkeypatch):
    """A forward hook on the MLP or on the layer (it would see the output), or a layer whose forward does not
    end in ``residual + mlp(...)`` (Gemma's post-MLP norm reads it): the output is made, as before."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer

    assert not lean_mlp._returns_residual_plus_mlp(Gemma2DecoderLayer)
    calls = _down_gemms_in_recompute(monkeypatch)
    model = make_model(tok)
    seen = []
    model.model.layers[1].mlp.register_forward_hook(lambda mod, args, out: seen.append(out.abs().sum().item()))
    model.model.layers[2].register_forward_hook(lambda mod, args, out: None)
    with sft_plugins.compose([NAME], options={NAME: {"offload": "always", "lean_mlp": True, "mlp_chunks": 0}}) as s:
        s.prepare(model=model)
        ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    # gate and up in each of the three first forwards and recomputes; the down projection's output in the three
    # first forwards and the two hooked layers' recomputes
    assert calls.count(False) == 2 * 2 * 3 and calls.count(True) == 3 + 2
    assert len(seen) == 2 and seen[0] == pytest.approx(seen[1])  # the MLP's hook: forward and recompute agree
