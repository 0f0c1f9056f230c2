"""padding_free's packed attention (``padding_free/attention.py``): one transformers registration per backend,
installed on a model and undone (registry entries gone once no model uses them); the loop backend equals
each sequence alone, the flex mask and the varlen call layout equal the loop; on the GPU every backend
runs its kernel (no fallback probe recorded) and stays within bf16 noise."""

from __future__ import annotations

import inspect

import pytest
import torch

import sft_plugins
from sft_plugins.embedded import build_model
from sft_plugins.plugins.padding_free import attention as pa
from sft_plugins.plugins.shared import PackedCollator

from .helpers import CUDA, LOCAL, alone, assert_same, packed, packed_registry, samples_of


def test_packed_equals_alone_loop_backend(tok):
    """Our own AttentionInterface backend (one sdpa per sequence), installed and undone by the plugin."""
    model = build_model(tokenizer=tok)
    samples = samples_of(tok)
    batch = PackedCollator(pad_token_id=tok.pad_token_id)([{"input_ids": s} for s in samples])
    ref = alone(model, samples)
    stack = sft_plugins.compose(["padding_free"], options={"padding_free": {"attention": "loop"}})
    stack.prepare(model=model)
    assert model.config._attn_implementation == pa.impl_name("loop") == "sft_packed_loop"
    ours = {"sft_packed_loop"}
    assert packed_registry() == {"AttentionInterface": ours, "AttentionMaskInterface": ours}
    assert_same(ref, packed(model, batch, samples))
    # without cu_seq_lens the backend finds the boundaries from position_ids
    assert_same(ref, packed(model, {k: batch[k] for k in ("input_ids", "position_ids")}, samples))
    # a padded batch with an attention mask (another collator, eval) goes through sdpa with that mask
    padded = torch.full((2, 20), tok.pad_token_id)
    mask = torch.zeros(2, 20, dtype=torch.long)
    for i, s in enumerate(samples[:2]):
        padded[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        ours = model(input_ids=padded, attention_mask=mask, use_cache=False).logits
    stack.undo()
    with torch.no_grad():
        theirs = model(input_ids=padded, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa" and model.config.use_cache is True
    # the registrations are undone too
    assert packed_registry() == {"AttentionInterface": set(), "AttentionMaskInterface": set()}


def test_install_per_backend_and_registry_kept_while_used(tok):
    """``install`` switches one model to one backend's name; the entry stays registered while another model
    still uses it, and goes with the last undo. An unknown backend is refused."""
    a, b = build_model(tokenizer=tok), build_model(tokenizer=tok)
    undo_a = pa.install(a, "loop")
    undo_b = pa.install(b, "loop")
    try:
        assert a.config._attn_implementation == b.config._attn_implementation == "sft_packed_loop"
        undo_a()
        assert a.config._attn_implementation == "sdpa" and b.config._attn_implementation == "sft_packed_loop"
        assert packed_registry()["AttentionInterface"] == {"sft_packed_loop"}
    finally:
        undo_b()
    assert b.config._attn_implementation == "sdpa"
    assert packed_registry() == {"AttentionInterface": set(), "AttentionMaskInterface": set()}
    with pytest.raises(ValueError, match="backend must be one of"):
        pa.install(a, "dense")
    assert a.config._attn_implementation == "sdpa" and not packed_registry()["AttentionInterface"]


def test_flex_block_mask_logic_cpu():
    """The flex backend's document-causal mask, run through eager flex_attention on CPU (small T)."""
    pytest.importorskip("torch.nn.attention.flex_attention")

    torch.manual_seed(0)
    lens = [5, 3, 8]
    cu = torch.tensor([0, 5, 8, 16], dtype=torch.int32)
    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    try:
        out = pa._run_flex(q, k, v, cu, None)
    except Exception as exc:  # eager flex on CPU is a reference path; skip if this torch lacks it
        pytest.skip(f"eager flex_attention unavailable on CPU: {exc}")
    ref = pa._run_loop(q, k, v, cu, None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert sum(lens) == 16


def _fake_varlen(with_gqa_flag: bool):
    """A CPU stand-in with varlen_attn's two known signatures (causal via window_size), to check our
    layout, causality and GQA handling; the real kernel runs in the GPU tests."""
    import torch.nn.functional as F

    def run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
            window_size=(-1, -1), **kw):
        assert tuple(window_size) == (-1, 0), "must ask for causal attention"
        assert kw.get("enable_gqa", False) or key.shape[1] == query.shape[1]
        cu = cu_seq_q.tolist()
        outs = []
        for s, e in zip(cu[:-1], cu[1:]):
            q, k, v = (t[s:e].transpose(0, 1) for t in (query, key, value))
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                       enable_gqa=k.shape[0] != q.shape[0]).transpose(0, 1))
        return torch.cat(outs)

    if with_gqa_flag:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False):
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size,
                       enable_gqa=enable_gqa)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1)):
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size)
    return varlen_attn


@pytest.mark.parametrize("with_gqa_flag", [True, False])
def test_varlen_call_layout_with_cpu_stand_in(monkeypatch, with_gqa_flag):
    fake = _fake_varlen(with_gqa_flag)
    monkeypatch.setattr(pa, "_varlen_kwargs", lambda: (fake, frozenset(inspect.signature(fake).parameters)))
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 8, 16], dtype=torch.int32)
    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    torch.testing.assert_close(pa._run_varlen(q, k, v, cu, 8, 0.3), pa._run_loop(q, k, v, cu, 0.3))


# -- GPU paths (skipped without CUDA) -----------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["varlen", "flex", "loop"])
def test_gpu_backends_equal_alone(tok, backend):
    """bf16 on the GPU: our packed row gives each sequence the loss it gets alone, within bf16 kernel noise,
    and far closer than the contaminated row (the all-ones-mask trap) does; the backend asked for ran."""
    if backend == "varlen" and not pa.varlen_available():
        pytest.skip("torch without a usable torch.nn.attention.varlen")
    # varlen's flash kernel takes fp16/bf16 queries only: an fp32 model under autocast gets fp32 queries out of
    # RoPE, which the packed attention routes to flex instead. So varlen runs a bf16 model, the others fp32
    # weights under bf16 autocast.
    dtype = torch.bfloat16 if backend == "varlen" else torch.float32
    model = build_model(tokenizer=tok, dtype=dtype).cuda()
    samples = samples_of(tok)
    batch = PackedCollator(pad_token_id=tok.pad_token_id)([{"input_ids": s} for s in samples])
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = alone(model, samples, device="cuda")
        trapped = packed(model, dict(batch, attention_mask=torch.ones_like(batch["input_ids"])), samples)
        stack = sft_plugins.compose(["padding_free"], options={"padding_free": {"attention": backend}},
                                    plugins=LOCAL)
        stack.prepare(model=model)
        assert model.config._attn_implementation == pa.impl_name(backend)
        got = packed(model, batch, samples)
        stack.undo()
    # the kernel asked for ran here: it was probed and no probe recorded a failure (a silent fallback)
    assert not any(pa.KERNEL_PROBES.values()), pa.KERNEL_PROBES
    if backend != "loop":
        assert pa.KERNEL_PROBES.get(backend, "not probed") is None, pa.KERNEL_PROBES
    ours = max(float((b - a).abs().max()) for a, b in zip(ref[0], got[0]))
    trap = max(float((b - a).abs().max()) for a, b in zip(ref[0], trapped[0]))
    assert ours <= 2e-2 and ours < 0.25 * trap, (ours, trap)
    for name in ref[1]:  # gradients too, as relative norms (bf16 noise is per element)
        a, b = ref[1][name].float(), got[1][name].float()
        assert float((b - a).norm()) <= 5e-2 * float(a.norm()) + 1e-6, name


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_auto_picks_fast_path(tok):
    from trl import SFTConfig

    model = build_model(tokenizer=tok, dtype=torch.bfloat16).cuda()
    args = SFTConfig(output_dir="/tmp/pf", report_to="none")
    with sft_plugins.compose(["padding_free"], plugins=LOCAL) as stack:
        stack.prepare(model=model, args=args)
        expected = pa.impl_name("varlen" if pa.varlen_available() else "flex")
        assert model.config._attn_implementation == expected
    assert model.config._attn_implementation != expected and not packed_registry()["AttentionInterface"]
