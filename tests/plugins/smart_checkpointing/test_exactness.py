"""smart_checkpointing: exactness against no checkpointing, the host budget, undo, refusals.

CPU tests run the whole save/restore machinery with ``offload="always"`` (CPU tensors copied through
the host pool), so everything but the CUDA streams is exercised without a GPU. GPU tests run the real
pinned, side-stream path and skip cleanly without CUDA.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import warnings

import pytest
import torch

import sft_plugins
from sft_plugins import PluginError
from sft_plugins.embedded import build_dataset, build_model, build_tokenizer
from sft_plugins.plugins import smart_checkpointing as sc

NAME = "smart_checkpointing"
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: on a shared 2-core machine every multi-threaded op waits for a busy core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _model(tok, layers: int = 3, dropout: float = 0.0, device: str = "cpu", dtype=torch.float32):
    model = build_model("tiny", tokenizer=tok, num_hidden_layers=layers, attention_dropout=dropout,
                        dtype=dtype).to(device)
    model.train()
    return model


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(123)  # LoRA's A matrices are drawn from the global RNG
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))


def _train(model, tok, *, steps: int = 20, seed: int = 0, batches=None, device: str = "cpu"):
    """Manual SGD loop; returns per-step losses and the last step's gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)  # dropout draws
    losses, grads = [], {}
    for step in range(steps):
        length = 9 + (step * 7) % 23  # varying lengths: buffers must be reused and grown, not reallocated
        ids = torch.randint(0, len(tok), (2, length), generator=gen).to(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


def _assert_same(a, b, tol: float = 1e-5):
    (la, ga), (lb, gb) = a, b
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert abs(x - y) <= tol * max(1.0, abs(x)), (la, lb)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=tol, atol=tol, msg=name)


def _run(tok, options=None, *, lora=False, dropout=0.0, layers=3, steps=20, device="cpu", collect=None):
    model = _model(tok, layers, dropout, device)
    if lora:
        model = _lora(model)
    if options is None:
        return _train(model, tok, steps=steps, device=device)
    with sft_plugins.compose([NAME], options={NAME: options}) as stack:
        stack.prepare(model=model)
        result = _train(model, tok, steps=steps, device=device)
        if collect is not None:
            collect.update(sc.stats(model))
    return result


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


# -- exactness --------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_parity_20_steps_offloaded(tok, lora):
    stats: dict = {}
    base = _run(tok, lora=lora, dropout=0.1)
    ours = _run(tok, {"offload": "always", "keep_last_on_gpu": 1}, lora=lora, dropout=0.1, collect=stats)
    _assert_same(base, ours)
    assert stats["calls"] == 20 * 3 and stats["plain_calls"] == 0
    assert stats["host_bytes"] == 2 * stats["kept_bytes"]  # 2 of 3 layers offloaded, the last kept
    assert stats["live"] == 0


def test_parity_plain_checkpointing_without_cuda(tok):
    """offload="never" (and "auto" without CUDA) is plain checkpointing through the same function."""
    stats: dict = {}
    _assert_same(_run(tok, lora=True, steps=5), _run(tok, {"offload": "never"}, lora=True, steps=5, collect=stats))
    assert stats["calls"] == 15 and stats["host_bytes"] == 0 and stats["kept_bytes"] == stats["saved_bytes"]


def test_parity_on_demand_without_prefetch(tok):
    stats: dict = {}
    opts = {"offload": "always", "prefetch": 0, "keep_last_on_gpu": 0}
    _assert_same(_run(tok, steps=4), _run(tok, opts, steps=4, collect=stats))
    assert stats["offloaded_fraction"] == 1.0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_parity_with_chunked_mlp_recompute(tok, lora):
    stats: dict = {}
    opts = {"offload": "always", "prefetch": 0, "keep_last_on_gpu": 0, "mlp_chunks": 3}
    _assert_same(_run(tok, lora=lora, dropout=0.1, steps=6),
                 _run(tok, opts, lora=lora, dropout=0.1, steps=6, collect=stats))
    assert stats["calls"] == 18


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("chunks", [0, 2], ids=["whole", "chunked"])
@pytest.mark.parametrize("h_rows", [None, 1], ids=["h_default", "h_row_chunks"])
def test_parity_with_lean_mlp(tok, lora, chunks, h_rows, monkeypatch):
    """The lean SwiGLU function in the recompute: same losses and gradients as no checkpointing (also with
    its product made in row chunks, which tiny inputs otherwise never are)."""
    from sft_plugins.plugins import _lean_mlp

    if h_rows is not None:
        monkeypatch.setattr(_lean_mlp, "_MIN_CHUNK_ROWS", h_rows)
        assert len(_lean_mlp._row_chunks(9)) == 3 and len(_lean_mlp._row_chunks(40)) == 4
    calls = []
    apply = _lean_mlp._LeanSwiGLU.apply
    monkeypatch.setattr(_lean_mlp._LeanSwiGLU, "apply", lambda *a: (calls.append(1), apply(*a))[1])
    opts = {"offload": "always", "lean_mlp": True, "mlp_chunks": chunks}
    _assert_same(_run(tok, lora=lora, dropout=0.1, steps=6), _run(tok, opts, lora=lora, dropout=0.1, steps=6))
    assert len(calls) == 6 * 3 * max(chunks, 1)  # every layer's recompute (each chunk's) went through it


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_parity_with_lean_norm(tok, lora, monkeypatch):
    """The fused RMSNorm in the recompute (with the lean MLP): same losses and gradients as no checkpointing,
    the norms' weight gradients included (full fine-tuning)."""
    from sft_plugins.plugins import _lean_norm

    calls = []
    apply = _lean_norm._LeanRMSNorm.apply
    monkeypatch.setattr(_lean_norm._LeanRMSNorm, "apply", lambda *a: (calls.append(1), apply(*a))[1])
    opts = {"offload": "always", "lean_mlp": True, "lean_norm": True}
    _assert_same(_run(tok, lora=lora, dropout=0.1, steps=6), _run(tok, opts, lora=lora, dropout=0.1, steps=6))
    # two norms per layer in every recompute (the final norm is not patched), but for LoRA's first input norm:
    # nothing there needs a gradient (frozen embeddings and norm weight), so it runs as is
    assert len(calls) == 6 * (3 * 2 - lora)


def test_lean_norm_refusal_and_undo(tok):
    model = _model(tok, layers=2)
    norms = [model.model.layers[0].input_layernorm, model.model.layers[1].post_attention_layernorm]
    with sft_plugins.compose([NAME], options={NAME: {"lean_norm": True}}) as stack:
        stack.prepare(model=model)
        assert all("forward" in n.__dict__ for n in norms) and "forward" not in model.model.norm.__dict__
    assert all("forward" not in n.__dict__ for n in norms)
    for layer in model.model.layers:
        layer.input_layernorm = layer.post_attention_layernorm = torch.nn.LayerNorm(layer.mlp.up_proj.in_features)
    with pytest.raises(PluginError, match="lean_norm needs Llama-style RMSNorms"):
        sft_plugins.compose([NAME], options={NAME: {"lean_norm": True}}).prepare(model=model)
    with pytest.raises(PluginError, match="'lean_norm' must be true, false or \"auto\""):
        sft_plugins.compose([NAME], options={NAME: {"lean_norm": "yes"}}).prepare(model=_model(tok, layers=2))


def test_lean_mlp_refusals_fallback_and_undo(tok):
    from peft import LoraConfig, get_peft_model

    from sft_plugins.plugins import _lean_mlp

    # LoRA dropout everywhere: nothing to fuse exactly, so the option is refused with the reason
    model = get_peft_model(_model(tok, layers=2), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
    with pytest.raises(PluginError, match="lean_mlp needs SwiGLU.*without dropout"):
        sft_plugins.compose([NAME], options={NAME: {"lean_mlp": True}}).prepare(model=model)
    model = _lora(_model(tok, layers=2))
    mlp = model.base_model.model.model.layers[0].mlp
    with sft_plugins.compose([NAME], options={NAME: {"lean_mlp": True}}) as stack:
        stack.prepare(model=model)
        assert "forward" in mlp.__dict__ and _lean_mlp._plan(mlp) is not None
        mlp.up_proj.lora_dropout["default"] = torch.nn.Dropout(0.1)  # changed after prepare: checked per call
        assert _lean_mlp._plan(mlp) is None
    assert "forward" not in mlp.__dict__
    model = _model(tok, layers=2)
    for layer in model.model.layers:
        layer.mlp = torch.nn.Identity()
    with pytest.raises(PluginError, match="lean_mlp needs SwiGLU"):
        sft_plugins.compose([NAME], options={NAME: {"lean_mlp": True}}).prepare(model=model)


def test_chunked_mlp_is_undone_and_refused_without_dense_mlp(tok):
    model = _model(tok, layers=2)
    with sft_plugins.compose([NAME], options={NAME: {"mlp_chunks": 2}}) as stack:
        stack.prepare(model=model)
        assert "forward" in model.model.layers[0].mlp.__dict__
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)
    model.model.layers[1].mlp = torch.nn.Identity()
    with pytest.raises(PluginError, match="mlp_chunks"):
        sft_plugins.compose([NAME], options={NAME: {"mlp_chunks": 2}}).prepare(model=model)


def test_auto_mlp_chunks_tiles_only_when_memory_is_short():
    from sft_plugins.plugins._offload import auto_mlp_chunks

    gib = 1 << 30
    assert auto_mlp_chunks(4 * gib, 100 * gib) == 1   # plenty: no extra MLP forward
    assert auto_mlp_chunks(4 * gib, 8 * gib) == 1     # exactly half: still untiled
    assert auto_mlp_chunks(5 * gib, 8 * gib) == 3     # each chunk's share <= a quarter of the headroom
    assert auto_mlp_chunks(4 * gib, 2 * gib) == 8
    assert auto_mlp_chunks(4 * gib, 0) == 32 and auto_mlp_chunks(400 * gib, gib) == 32


def test_auto_mlp_chunks_is_the_default_and_untiled_off_cuda(tok, monkeypatch):
    from sft_plugins.plugins import _offload

    assert sc.DEFAULT_OPTIONS["mlp_chunks"] == "auto"
    calls = []
    monkeypatch.setattr(_offload._TiledMLP, "apply", lambda *a: calls.append(a))
    _assert_same(_run(tok, steps=2), _run(tok, {"offload": "always"}, steps=2))
    assert calls == []  # CPU tensors: "auto" never tiles
    with pytest.raises(PluginError, match="mlp_chunks.*or auto"):
        sft_plugins.compose([NAME], options={NAME: {"mlp_chunks": "fast"}}).prepare(model=_model(tok, layers=2))
    model = _model(tok, layers=2)
    model.model.layers[1].mlp = torch.nn.Identity()  # no dense MLP: "auto" leaves it alone, no refusal
    with sft_plugins.compose([NAME]) as stack:
        stack.prepare(model=model)
        assert "forward" in model.model.layers[0].mlp.__dict__


def test_no_cuda_says_so_once(tok, monkeypatch):
    if CUDA:
        pytest.skip("only meaningful without CUDA")
    monkeypatch.setattr(sc, "_WARNED_NO_CUDA", False)
    with pytest.warns(RuntimeWarning, match="plain activation checkpointing"):
        _run(tok, {}, steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _run(tok, {}, steps=1)


def test_buffers_reused_across_steps(tok):
    model = _model(tok, layers=2)
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


def test_two_forwards_before_one_backward(tok):
    def run(options):
        model = _model(tok, layers=2)
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

    _assert_same(run(None), run({"offload": "always", "keep_last_on_gpu": 0}))


def test_graph_carrying_side_input_uses_torch_checkpoint():
    """A tensor needing its own gradient besides the hidden states falls back to torch's checkpoint."""
    from sft_plugins.plugins import _offload

    layer = torch.nn.Linear(4, 4)
    cfg = _offload.OffloadConfig(mode="copy", host_budget=1 << 20, overflow="gpu", pageable_budget=0,
                                 host_reserve=0)
    off = _offload.Offloader(cfg)
    fn = _offload.make_checkpoint_fn(layer, _offload.LayerPlan(off, 0, keep=False))
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


# -- the host budget --------------------------------------------------------------------------------

def test_tiny_budget_falls_back_to_gpu_exactly(tok):
    stats: dict = {}
    # each layer input is at most 2 x 31 x 64 fp32 = 15.9 KB -> a 16 KiB buffer: the budget holds one layer
    ours = _run(tok, {"offload": "always", "keep_last_on_gpu": 0, "host_budget_gb": 20_000 / 2**30},
                collect=stats)
    _assert_same(_run(tok), ours)
    assert stats["host_bytes"] > 0 and stats["fallback_bytes"] > 0 and stats["pageable_bytes"] == 0
    assert stats["host_bytes_held"] <= 20_000


def test_tiny_budget_overflows_to_pageable(tok):
    stats: dict = {}
    opts = {"offload": "always", "keep_last_on_gpu": 0, "host_budget_gb": 20_000 / 2**30,
            "overflow": "pageable", "pageable_budget_gb": 20_000 / 2**30}
    _assert_same(_run(tok, steps=6), _run(tok, opts, steps=6, collect=stats))
    assert stats["host_bytes"] > 0 and stats["pageable_bytes"] > 0 and stats["fallback_bytes"] > 0
    assert stats["pageable_bytes_held"] <= 20_000


def test_host_reserve_is_never_crossed(tok, caplog):
    stats: dict = {}
    with caplog.at_level("WARNING", logger="sft_plugins"):
        _run(tok, {"offload": "always", "host_reserve_gb": 1e6}, steps=2, collect=stats)
    assert stats["allocations"] == 0 and stats["host_bytes"] == 0 and stats["fallback_bytes"] > 0
    assert "reserve" in caplog.text


# -- undo -------------------------------------------------------------------------------------------

def _ckpt_state(model):
    return [(name, {k: v for k, v in m.__dict__.items() if k in ("gradient_checkpointing", "_gradient_checkpointing_func")})
            for name, m in model.named_modules()]


def test_undo_restores_the_model_exactly(tok):
    model = _model(tok)
    model.gradient_checkpointing_enable()  # a user's own HF checkpointing is merged, then given back
    before = _ckpt_state(model)
    stack = sft_plugins.compose([NAME])
    stack.prepare(model=model)
    assert model.is_gradient_checkpointing
    assert all(getattr(layer._gradient_checkpointing_func, "__qualname__", "").startswith("smart_checkpoint")
               for layer in model.model.layers)
    stack.undo()
    assert _ckpt_state(model) == before
    with pytest.raises(PluginError):
        sc.stats(model)

    fresh = _model(tok)
    before = _ckpt_state(fresh)
    with sft_plugins.compose([NAME]) as stack:
        stack.prepare(model=fresh)
    assert _ckpt_state(fresh) == before and not fresh.is_gradient_checkpointing
    assert not sc._ACTIVE


# -- trainers ---------------------------------------------------------------------------------------

def _sft(tok, names, *, args_kw=None, lora=True, model=None):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir="/tmp/sft_sc", bf16=False, use_cpu=True, report_to="none", max_steps=20,
                     per_device_train_batch_size=4, logging_steps=1, learning_rate=5e-3, save_strategy="no",
                     seed=0, max_length=64, dataloader_num_workers=0, **(args_kw or {}))
    model = model if model is not None else _model(tok, layers=2)
    stack = sft_plugins.compose(names)
    kwargs = stack.prepare(model=model, args=args, train_dataset=build_dataset(80), processing_class=tok,
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if lora else None)
    trainer = SFTTrainer(**kwargs)
    return stack, trainer


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sfttrainer_lora_parity(tok):
    base_stack, base = _sft(tok, [], args_kw={"gradient_checkpointing": False})
    base.train()
    stack, ours = _sft(tok, [NAME])  # TRL's default gradient_checkpointing=True: the plugin turns it off
    assert not (getattr(ours.args, "activation_checkpointing", None) or ours.args.gradient_checkpointing)
    ours.train()
    calls = sc.stats(ours.model)["calls"]
    stack.undo()
    assert calls == 20 * 2
    a, b = _losses(base), _losses(ours)
    assert len(a) == 20 and a == pytest.approx(b, rel=1e-5)
    for (n, p), (m, q) in zip(base.model.named_parameters(), ours.model.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_trainer_full_finetuning_parity(tok):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    data = build_dataset(80, form="text").map(lambda r: tok(r["text"], truncation=True, max_length=64),
                                              remove_columns=["text"])

    def train(names):
        model = _model(tok, layers=2)
        args = TrainingArguments(output_dir="/tmp/sft_sc_tr", use_cpu=True, report_to="none", max_steps=20,
                                 per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-3,
                                 save_strategy="no", seed=0, gradient_checkpointing=bool(names),
                                 dataloader_num_workers=0)
        with sft_plugins.compose(names) as stack:
            kwargs = stack.prepare(model=model, args=args, train_dataset=data,
                                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
            trainer = Trainer(**kwargs)
            trainer.train()
            calls = sc.stats(model)["calls"] if names else 0
        return _losses(trainer), calls, model

    (a, _, ma), (b, calls, mb) = train([]), train([NAME])
    assert calls == 40 and len(a) == 20 and a == pytest.approx(b, rel=1e-5)
    # the fused norm and MLP sum in another order: gradients equal to fp32 rounding, which Adam's m/sqrt(v)
    # scales up on entries whose gradient is near zero (a few embedding rows end ~1e-5 apart)
    for p, q in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-5)


def test_checkpointing_re_enabled_after_prepare_is_caught(tok):
    stack, trainer = _sft(tok, [NAME])
    try:
        trainer.model.get_base_model().gradient_checkpointing_enable()
        with pytest.raises(PluginError, match="replaced"):
            trainer.train()
    finally:
        stack.undo()


# -- refusals and merges ----------------------------------------------------------------------------

@pytest.mark.parametrize("args_kw, match", [
    ({"activation_offloading": True}, "activation_offloading"),
    ({"gradient_checkpointing_kwargs": {"selective": True}}, "selective"),
    ({"gradient_checkpointing_kwargs": {"offload": False}}, "offload=False"),
    ({"gradient_checkpointing_kwargs": {"determinism_check": "none"}}, "determinism_check"),
])
def test_refuses_conflicting_args(tok, args_kw, match):
    with pytest.raises(PluginError, match=match):
        _sft(tok, [NAME], args_kw=args_kw)


@pytest.mark.parametrize("options, match", [
    ({"offload": "yes"}, "offload"), ({"keep_last_on_gpu": -1}, "keep_last_on_gpu"),
    ({"overflow": "disk"}, "overflow"), ({"budget": 1}, "unknown option"), ({"prefetch": -1}, "prefetch"),
])
def test_refuses_bad_options(tok, options, match):
    with pytest.raises(PluginError, match=match):
        sft_plugins.compose([NAME], options={NAME: options}).prepare(model=_model(tok, layers=1))


def test_refuses_models_it_cannot_checkpoint_and_foreign_patches(tok):
    with pytest.raises(PluginError, match="GradientCheckpointingLayer"):
        sft_plugins.compose([NAME]).prepare(model=torch.nn.Linear(2, 2))
    model = _model(tok, layers=1)
    model.model.layers[0]._gradient_checkpointing_func = lambda f, *a, **k: f(*a, **k)
    with pytest.raises(PluginError, match="custom checkpointing"):
        sft_plugins.compose([NAME]).prepare(model=model)


def test_refuses_a_plugin_that_wants_hf_checkpointing(tok):
    from trl import SFTConfig

    from sft_plugins import hookimpl

    class WantsHF:
        @hookimpl
        def sft_update_args(self):
            return {"gradient_checkpointing": True}

    stack = sft_plugins.compose([NAME, "other"], plugins={"other": WantsHF()})
    with pytest.raises(PluginError, match="cannot be composed"):
        stack.prepare(model=_model(tok, layers=1), args=SFTConfig(output_dir="/tmp/x", use_cpu=True, bf16=False,
                                                                   report_to="none"))


def test_merges_hf_checkpointing_kwargs(tok):
    from trl import SFTConfig

    args = SFTConfig(output_dir="/tmp/x", use_cpu=True, bf16=False, report_to="none",
                     gradient_checkpointing_kwargs={"use_reentrant": True, "every_n_layers": 2,
                                                    "preserve_rng_state": False})
    model = _model(tok, layers=3)
    with sft_plugins.compose([NAME]) as stack:
        out = stack.prepare(model=model, args=args)
        assert not out["args"].gradient_checkpointing and args.gradient_checkpointing  # user's args untouched
        flags = [layer.gradient_checkpointing for layer in model.model.layers]
        assert flags == [True, False, True]


# -- GPU: the real offload path ---------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gpu_parity_and_offloaded_fraction(tok, lora):
    stats: dict = {}
    base = _run(tok, lora=lora, dropout=0.1, layers=4, device="cuda")
    ours = _run(tok, {}, lora=lora, dropout=0.1, layers=4, device="cuda", collect=stats)
    _assert_same(base, ours, tol=1e-5)
    assert stats["offloaded_fraction"] == pytest.approx(3 / 4)  # all but the last layer
    assert stats["fallback_bytes"] == 0 and stats["live"] == 0
    assert stats["allocations"] <= 3 * 3  # one buffer per layer, grown at most at a few powers of two


@needs_cuda
def test_gpu_lean_setting_is_exact(tok):
    """Everything offloaded, fetched on demand, MLP recomputed in chunks: still the baseline's numbers."""
    stats: dict = {}
    opts = {"prefetch": 0, "keep_last_on_gpu": 0, "mlp_chunks": 2}
    _assert_same(_run(tok, lora=True, layers=3, steps=6, device="cuda"),
                 _run(tok, opts, lora=True, layers=3, steps=6, device="cuda", collect=stats))
    assert stats["offloaded_fraction"] == 1.0


@needs_cuda
def test_gpu_buffers_are_pinned_and_reused(tok):
    model = _model(tok, layers=3, device="cuda")
    with sft_plugins.compose([NAME]) as stack:
        stack.prepare(model=model)
        patch = sc._ACTIVE[-1]
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
    _assert_same(_run(tok, layers=4, steps=6, device="cuda"),
                 _run(tok, opts, layers=4, steps=6, device="cuda", collect=stats))
    assert stats["host_bytes"] and stats["pageable_bytes"] and stats["fallback_bytes"]


@needs_cuda
def test_gpu_sfttrainer_bf16_lora_runs(tok):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model = build_model("tiny", tokenizer=tok, num_hidden_layers=4)
    args = SFTConfig(output_dir="/tmp/sft_sc_gpu", bf16=True, report_to="none", max_steps=10,
                     per_device_train_batch_size=4, logging_steps=1, save_strategy="no", max_length=128)
    with sft_plugins.compose([NAME]) as stack:
        kwargs = stack.prepare(model=model, args=args, train_dataset=build_dataset(80), processing_class=tok,
                               peft_config=LoraConfig(r=4, target_modules="all-linear"))
        trainer = SFTTrainer(**kwargs)
        trainer.train()
        stats = sc.stats(trainer.model)
    assert stats["calls"] == 40 and stats["offloaded_fraction"] == pytest.approx(3 / 4)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


@needs_cuda
def test_gpu_auto_mlp_chunks_tiles_when_memory_is_short_and_stays_exact(tok, monkeypatch):
    from sft_plugins.plugins import _offload

    assert _offload.auto_mlp_chunks(1, _offload.cuda_headroom(torch.device("cuda"))) == 1  # an idle H200
    # the short cut (no allocator statistics) when the driver's free memory alone is enough
    assert _offload.cuda_headroom(torch.device("cuda"), enough=1 << 20) >= 1 << 20
    tiled = []
    apply = _offload._TiledMLP.apply
    monkeypatch.setattr(_offload, "cuda_headroom", lambda device, enough=None: 0)  # as if the GPU were full: tile
    monkeypatch.setattr(_offload._TiledMLP, "apply", lambda *a: (tiled.append(a[1]), apply(*a))[1])
    monkeypatch.setattr(_offload, "_MAX_AUTO_CHUNKS", 4)
    _assert_same(_run(tok, layers=3, steps=4, device="cuda"), _run(tok, {}, layers=3, steps=4, device="cuda"))
    assert tiled and set(tiled) == {4}


def _gpu_bf16_lora_backward(tok, options, tokens, inter, hidden):
    """Three bf16 LoRA steps on the GPU (Triton kernels, autocast off, bf16 weights): losses, backward peak."""
    torch.manual_seed(0)
    model = _lora(build_model("tiny", tokenizer=tok, num_hidden_layers=2, intermediate_size=inter,
                              hidden_size=hidden, dtype=torch.bfloat16).cuda())
    model.train()
    ids = torch.randint(0, len(tok), (1, tokens), generator=torch.Generator().manual_seed(1)).cuda()
    losses, peaks = [], []
    with sft_plugins.compose([NAME], options={NAME: {"offload": "never", **options}}) as stack:
        stack.prepare(model=model)
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss.backward()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
            losses.append(loss.item())
            model.zero_grad(set_to_none=True)
    return losses, max(peaks)


@needs_cuda
def test_gpu_lean_mlp_bf16_lora_same_loss_less_memory(tok):
    """The lean recompute gives the same losses to bf16 rounding and a lower backward peak by several
    [tokens, intermediate] tensors (more with its product in row chunks: 4096 tokens make 4)."""
    tokens, inter, hidden = 4096, 4096, 128
    plain_losses, plain_peak = _gpu_bf16_lora_backward(tok, {"lean_mlp": False}, tokens, inter, hidden)
    lean_losses, lean_peak = _gpu_bf16_lora_backward(tok, {"lean_mlp": True}, tokens, inter, hidden)
    for a, b in zip(plain_losses, lean_losses):
        assert abs(a - b) <= 2e-2 * abs(a)
    unit = tokens * inter * 2  # one bf16 [tokens, intermediate] tensor
    assert plain_peak - lean_peak >= 4 * unit, (plain_peak / unit, lean_peak / unit)


@needs_cuda
def test_gpu_lean_norm_bf16_lora_same_loss_less_memory(tok):
    """The fused RMSNorm keeps no fp32 copy of its input: on top of the lean MLP, the backward peak drops by at
    least one fp32 [tokens, hidden] tensor, with the same losses to bf16 rounding."""
    tokens, inter, hidden = 4096, 1024, 1024
    mlp_losses, mlp_peak = _gpu_bf16_lora_backward(tok, {"lean_mlp": True, "lean_norm": False}, tokens, inter,
                                                   hidden)
    both_losses, both_peak = _gpu_bf16_lora_backward(tok, {"lean_mlp": True, "lean_norm": True}, tokens, inter,
                                                     hidden)
    for a, b in zip(mlp_losses, both_losses):
        assert abs(a - b) <= 2e-2 * abs(a)
    unit = tokens * hidden * 4  # one fp32 [tokens, hidden] tensor
    assert mlp_peak - both_peak >= unit, (mlp_peak / unit, both_peak / unit)
