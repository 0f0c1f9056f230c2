"""padding_free: packed rows equal each sample alone (loss and gradients), the traps, SFTTrainer parity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sft_plugins
from sft_plugins.embedded import build_dataset, build_model, build_tokenizer
from sft_plugins.plugins import padding_free
from sft_plugins.plugins._collate import PackedCollator

CUDA = torch.cuda.is_available()
# The GPU machine runs from a checkout (no entry points installed): the GPU tests name the module.
_LOCAL = {"padding_free": padding_free}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _samples(tok, n=4):
    texts = ["Copy: apple river stone\napple river stone", "Add 3 and 4.\n7",
             "Reverse: green quick light north table\ntable north light quick green", "Sort: 5 3 9\n3 5 9"][:n]
    return [tok(t)["input_ids"] for t in texts]


def _token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")


def _alone(model, samples, device="cpu"):
    """Per-token losses of each sample run alone, and the gradients of their total."""
    model.zero_grad()
    losses = []
    for s in samples:
        ids = torch.tensor(s, device=device)
        logits = model(input_ids=ids[None], use_cache=False).logits[0]
        losses.append(_token_losses(logits, ids))
    torch.cat(losses).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return losses, grads


def _packed(model, batch, samples):
    model.zero_grad()
    ids = batch["input_ids"][0]
    logits = model(**batch, use_cache=False).logits[0]
    cu = [0] + torch.tensor([len(s) for s in samples]).cumsum(0).tolist()
    losses = [_token_losses(logits[s:e], ids[s:e]) for s, e in zip(cu[:-1], cu[1:])]
    torch.cat(losses).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return losses, grads


def _assert_same(alone, packed, atol=1e-5, rtol=1e-5):
    for a, b in zip(alone[0], packed[0]):
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol)
    for name in alone[1]:
        torch.testing.assert_close(packed[1][name], alone[1][name], atol=atol, rtol=rtol, msg=name)


# -- the collator ---------------------------------------------------------------------------------
def test_collator_layout():
    out = PackedCollator(pad_token_id=0)([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert out["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 5] and out["cu_seq_lens_q"].dtype == torch.int32
    assert out["max_length_q"] == out["max_length_k"] == 3
    assert "attention_mask" not in out  # an all-ones mask would disable packed-sequence detection


def test_collator_masks_packed_rows_and_padding():
    c = PackedCollator(pad_token_id=9, pad_to_multiple_of=8)
    out = c([{"input_ids": [1, 2, 3, 4, 5], "seq_lengths": [2, 3], "completion_mask": [0, 1, 0, 1, 1]},
             {"input_ids": [6, 7, 8], "assistant_masks": [1, 1, 0]}])
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]  # already a multiple of 8
    assert out["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]]
    assert out["labels"].tolist() == [[-100, 2, -100, 4, 5, -100, 7, -100]]
    out = c([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}])
    assert out["input_ids"].tolist() == [[1, 2, 3, 9, 9, 9, 9, 9]]
    assert out["labels"].tolist() == [[-100, 2, 3] + [-100] * 5]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]  # padding is its own sequence
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 8]
    # completion_only_loss=False keeps prompt tokens, like SFTTrainer
    out = PackedCollator(completion_only_loss=False)([{"input_ids": [1, 2, 3], "completion_mask": [0, 0, 1]}])
    assert out["labels"].tolist() == [[-100, 2, 3]]


# -- the central test: packed == alone, loss and gradients, fp32 -----------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_equals_alone_cpu(tok, impl):
    model = build_model(tokenizer=tok, attn_implementation=impl)
    samples = _samples(tok)
    batch = PackedCollator(pad_token_id=tok.pad_token_id)([{"input_ids": s} for s in samples])
    _assert_same(_alone(model, samples), _packed(model, batch, samples))


def test_packed_equals_alone_loop_backend(tok):
    """Our own AttentionInterface backend (one sdpa per sequence), installed and undone by the plugin."""
    model = build_model(tokenizer=tok)
    samples = _samples(tok)
    batch = PackedCollator(pad_token_id=tok.pad_token_id)([{"input_ids": s} for s in samples])
    ref = _alone(model, samples)
    stack = sft_plugins.compose(["padding_free"], options={"padding_free": {"attention": "loop"}})
    stack.prepare(model=model)
    assert model.config._attn_implementation == "sft_packed"
    _assert_same(ref, _packed(model, batch, samples))
    # without cu_seq_lens the backend finds the boundaries from position_ids
    _assert_same(ref, _packed(model, {k: batch[k] for k in ("input_ids", "position_ids")}, samples))
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
    from transformers import AttentionInterface

    assert "sft_packed" not in AttentionInterface._global_mapping  # the registration is undone too


def test_flex_block_mask_logic_cpu(tok):
    """The flex backend's document-causal mask, run through eager flex_attention on CPU (small T)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from sft_plugins.plugins import _packed_attention as pa

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
    import inspect

    from sft_plugins.plugins import _packed_attention as pa

    fake = _fake_varlen(with_gqa_flag)
    monkeypatch.setattr(pa, "_varlen_kwargs", lambda: (fake, frozenset(inspect.signature(fake).parameters)))
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 8, 16], dtype=torch.int32)
    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    torch.testing.assert_close(pa._run_varlen(q, k, v, cu, 8, 0.3), pa._run_loop(q, k, v, cu, 0.3))


# -- the traps --------------------------------------------------------------------------------------
def test_all_ones_mask_trap(tok):
    """An all-ones attention mask next to packed position_ids lets sequences see each other; our
    collator sends none, so they stay apart."""
    model = build_model(tokenizer=tok)
    samples = _samples(tok, 2)
    batch = PackedCollator(pad_token_id=tok.pad_token_id)([{"input_ids": s} for s in samples])
    ref = _alone(model, samples)
    _assert_same(ref, _packed(model, batch, samples))
    trapped = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))
    with pytest.raises(AssertionError):
        _assert_same(ref, _packed(model, trapped, samples))


def test_cache_trap_and_our_patch(tok):
    """With the default use_cache=True, transformers skips packed-sequence detection (the second
    sequence attends to the first); the plugin sets config.use_cache=False, as plain Trainer needs."""
    model = build_model(tokenizer=tok)
    samples = _samples(tok, 2)
    batch = PackedCollator(pad_token_id=tok.pad_token_id)([{"input_ids": s} for s in samples])
    ids = batch["input_ids"][0]
    cu = batch["cu_seq_lens_q"].tolist()
    alone = _alone(model, samples)[0]

    def second_seq_loss():
        with torch.no_grad():
            logits = model(**batch).logits[0]  # no use_cache argument: the config decides, as in Trainer
        return _token_losses(logits[cu[1]:cu[2]], ids[cu[1]:cu[2]])

    assert model.config.use_cache is True
    assert not torch.allclose(second_seq_loss(), alone[1], atol=1e-4)  # the trap is real
    stack = sft_plugins.compose(["padding_free"])
    stack.prepare(model=model)
    torch.testing.assert_close(second_seq_loss(), alone[1], atol=1e-5, rtol=1e-5)
    stack.undo()
    assert model.config.use_cache is True


# -- refusals ---------------------------------------------------------------------------------------
def test_refusals(tok):
    from trl import SFTConfig

    model = build_model(tokenizer=tok)
    args = SFTConfig(output_dir="/tmp/pf", bf16=False, use_cpu=True, report_to="none", packing=True)
    with pytest.raises(sft_plugins.PluginError, match="packing"):
        sft_plugins.compose(["padding_free"]).prepare(model=model, args=args)
    if not CUDA:
        with pytest.raises(sft_plugins.PluginError, match="CUDA"):
            sft_plugins.compose(["padding_free"], options={"padding_free": {"attention": "varlen"}}).prepare(model=model)
    with pytest.raises(sft_plugins.PluginError, match="unknown options"):
        sft_plugins.compose(["padding_free"], options={"padding_free": {"bogus": 1}}).prepare(model=model)
    with pytest.raises(sft_plugins.PluginError, match="flash"):
        sft_plugins.compose(["padding_free"], options={"padding_free": {"attention": "flash"}}).prepare(model=model)
    assert model.config._attn_implementation == "sdpa"  # nothing left patched


def test_describe_and_args_never_mutated(tok):
    from trl import SFTConfig

    stack = sft_plugins.compose(["padding_free"])
    assert stack.describe()["padding_free"]["loss_parity"] == 1e-3
    args = SFTConfig(output_dir="/tmp/pf", bf16=False, use_cpu=True, report_to="none", padding_free=True,
                     max_length=None)
    out = stack.prepare(model=build_model(tokenizer=tok), args=args)
    assert out["args"].padding_free is False and out["args"].remove_unused_columns is False
    assert args.padding_free is True and isinstance(out["data_collator"], PackedCollator)
    stack.undo()


# -- loss-curve parity in a real SFTTrainer ---------------------------------------------------------
def _sft_losses(tok, names, form, steps=20, **kw):
    # short examples (max_words=24) keep 2 x 20 steps within a few seconds on a shared 2-core CPU
    from trl import SFTConfig, SFTTrainer

    model = build_model(tokenizer=tok)
    args = SFTConfig(output_dir="/tmp/pf_sft", per_device_train_batch_size=4, max_steps=steps, bf16=False,
                     use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", seed=0,
                     learning_rate=1e-3, max_length=256, gradient_checkpointing=False, disable_tqdm=True, **kw)
    with sft_plugins.compose(names) as stack:
        trainer = SFTTrainer(**stack.prepare(model=model, args=args, train_dataset=build_dataset(96, form=form, max_words=24),
                                             processing_class=tok))
        trainer.train()
    return [r["loss"] for r in trainer.state.log_history if "loss" in r], trainer


@pytest.mark.parametrize("form,steps,kw", [("conversational", 20, {}), ("prompt_completion", 8, {}),
                                           ("conversational", 8, {"assistant_only_loss": True})])
def test_sft_trainer_loss_parity(tok, form, steps, kw):
    base, _ = _sft_losses(tok, [], form, steps, **kw)
    ours, trainer = _sft_losses(tok, ["padding_free"], form, steps, **kw)
    assert len(base) == len(ours) == steps
    for step, (a, b) in enumerate(zip(base, ours)):
        assert abs(a - b) <= 1e-3 * abs(a), (step, a, b)
    assert isinstance(trainer.data_collator, PackedCollator)


def test_plain_trainer_tokenized_completion_mask(tok):
    """Plain transformers.Trainer on a tokenized dataset with completion_mask: our collator applies
    the mask (remove_unused_columns=False keeps it) and matches a padded, pre-labelled baseline."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    recs = build_dataset(64, form="prompt_completion")
    rows = []
    for r in recs:
        p, c = tok(r["prompt"])["input_ids"], tok(r["completion"] + tok.eos_token)["input_ids"]
        rows.append({"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)})
    ds = Dataset.from_list(rows)
    labelled = ds.map(lambda e: {"labels": [t if m else -100 for t, m in zip(e["input_ids"], e["completion_mask"])]},
                      remove_columns=["completion_mask"])

    def losses(names, dataset, collator):
        model = build_model(tokenizer=tok)
        args = TrainingArguments(output_dir="/tmp/pf_tr", per_device_train_batch_size=4, max_steps=6, use_cpu=True,
                                 report_to="none", logging_steps=1, save_strategy="no", seed=0, learning_rate=1e-3,
                                 disable_tqdm=True)
        with sft_plugins.compose(names) as stack:
            kw = stack.prepare(model=model, args=args, train_dataset=dataset, processing_class=tok)
            if collator is not None:
                kw["data_collator"] = collator
            trainer = Trainer(**kw)
            trainer.train()
        return [r["loss"] for r in trainer.state.log_history if "loss" in r]

    base = losses([], labelled, DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id))
    ours = losses(["padding_free"], ds, None)
    for a, b in zip(base, ours):
        assert abs(a - b) <= 1e-3 * abs(a), (a, b)


# -- GPU paths (the H200 runs these; skipped without CUDA) ------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["varlen", "flex", "loop"])
def test_gpu_backends_equal_alone(tok, backend):
    """bf16 autocast on the GPU: our packed row gives each sequence the loss it gets alone, within bf16
    kernel noise, and far closer than the contaminated row (the all-ones-mask trap) does."""
    from sft_plugins.plugins import _packed_attention as pa

    if backend == "varlen" and not pa.varlen_available():
        pytest.skip("torch without a usable torch.nn.attention.varlen")
    model = build_model(tokenizer=tok).cuda()
    samples = _samples(tok)
    batch = PackedCollator(pad_token_id=tok.pad_token_id)([{"input_ids": s} for s in samples])
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = _alone(model, samples, device="cuda")
        trapped = _packed(model, dict(batch, attention_mask=torch.ones_like(batch["input_ids"])), samples)
        stack = sft_plugins.compose(["padding_free"], options={"padding_free": {"attention": backend}},
                                    plugins=_LOCAL)
        stack.prepare(model=model)
        got = _packed(model, batch, samples)
        stack.undo()
    assert not any(k.endswith("_error") for k in pa._state), pa._state
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
    with sft_plugins.compose(["padding_free"], plugins=_LOCAL) as stack:
        stack.prepare(model=model, args=args)
        assert model.config._attn_implementation == "sft_packed"
