"""fused_ce in real trainers: the training loss goes through the fused kernel in SFTTrainer and Trainer.

What is held (fp32, CPU; the Triton kernel runs under TRITON_INTERPRET=1 from conftest, so the
20-step parity runs use tiny batches; other tests use the plugin's torch backend, the same math):

* SFTTrainer and Trainer: 20 steps baseline vs fused_ce, per-step loss within 1e-3 relative, TRL's
  entropy / mean_token_accuracy metrics close, and every step went through the kernel.
* TRL's DFT loss, gradient accumulation 4x1 == 1x4 (num_items_in_batch), TRL's own packing, composed
  with padding_free / packing, mixed precision (accelerate's autocast wrapper over our forward).
"""

from __future__ import annotations

import os

import pytest
import torch

from .helpers import TORCH, assert_losses_close, train_hf, train_sft


# -- training parity through the Triton kernel (interpreter on CPU) ---------------------------------
def test_sft_trainer_parity_20_steps(tmp_path, tok, sft_ds, backends_used):
    base, none_calls, _, ev0 = train_sft([], tmp_path, tok, sft_ds, evaluate=True)
    assert not backends_used
    fused, calls, _, ev1 = train_sft(["fused_ce"], tmp_path, tok, sft_ds, evaluate=True)
    # the trainer runs on the CPU here (use_cpu=True), also on a GPU machine: Triton only under the interpreter
    expected = "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    assert backends_used and set(backends_used) == {expected}
    assert none_calls is None and calls == {"fused_lm_head": 20}  # every step went through the kernel
    assert_losses_close(base, fused)
    assert_losses_close(base, fused, key="entropy")
    for x, y in zip(base, fused):  # one top-1 flip on a near tie would move it by ~0.03
        assert abs(x["mean_token_accuracy"] - y["mean_token_accuracy"]) <= 0.05
    mean = lambda logs: sum(r["mean_token_accuracy"] for r in logs) / len(logs)  # noqa: E731
    assert abs(mean(base) - mean(fused)) <= 0.01
    # eval ran through TRL's own head (eval mode is left alone) on the fused-trained weights
    assert abs(ev0["eval_loss"] - ev1["eval_loss"]) <= 1e-3 * abs(ev0["eval_loss"])


def test_trainer_parity_20_steps(tmp_path, tok, lm_ds, backends_used):
    base, _ = train_hf([], tmp_path, tok, lm_ds)
    assert not backends_used
    fused, calls = train_hf(["fused_ce"], tmp_path, tok, lm_ds)
    assert len(backends_used) == 20
    assert calls == {"labels": 20}
    assert_losses_close(base, fused)


def test_sft_dft_loss_parity(tmp_path, tok, sft_ds):
    # TRL's DFT loss weights each token by its probability: per-token log_probs gradients must be exact
    base = train_sft([], tmp_path, tok, sft_ds, steps=4, loss_type="dft")[0]
    fused, calls, _, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, options=TORCH, steps=4, loss_type="dft")
    assert calls == {"fused_lm_head": 4}
    assert_losses_close(base, fused)


# -- gradient accumulation -------------------------------------------------------------------------
@pytest.mark.parametrize("trainer", ["sft", "hf"])
def test_grad_accumulation_4x1_equals_1x4(tmp_path, tok, sft_ds, lm_ds, trainer):
    if trainer == "sft":
        run = lambda **kw: train_sft(["fused_ce"], tmp_path, tok, sft_ds, options=TORCH, steps=5, **kw)[0]  # noqa: E731
    else:
        run = lambda **kw: train_hf(["fused_ce"], tmp_path, tok, lm_ds, options=TORCH, steps=5, **kw)[0]  # noqa: E731
    one_by_four = run(bs=4)
    four_by_one = run(bs=1, gradient_accumulation_steps=4)
    assert_losses_close(one_by_four, four_by_one)


# -- packed rows -----------------------------------------------------------------------------------
def test_trl_packing_padding_free_parity(tmp_path, tok, sft_ds):
    # TRL's BFD packing: one row per batch, restarting position_ids, no attention_mask
    base = train_sft([], tmp_path, tok, sft_ds, steps=4, packing=True, max_length=64)[0]
    fused, calls, _, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, options=TORCH, steps=4, packing=True,
                                   max_length=64)
    assert calls == {"fused_lm_head": 4}
    assert_losses_close(base, fused)


@pytest.mark.parametrize("other", ["padding_free", "packing"])
def test_composes_with_padding_free_and_packing(tmp_path, tok, sft_ds, other):
    # one flattened row per batch (position_ids, no attention_mask): the kernel sees the same tokens
    base = train_sft([other], tmp_path, tok, sft_ds, steps=3, bs=4, max_length=64)[0]
    fused, calls, _, _ = train_sft([other, "fused_ce"], tmp_path, tok, sft_ds, options=TORCH, steps=3, bs=4,
                                   max_length=64)
    assert calls == {"fused_lm_head": 3}
    assert_losses_close(base, fused)


# -- mixed precision and GPU ----------------------------------------------------------------------------
def test_mixed_precision_autocast_wrapper(tmp_path, tok, lm_ds, sft_ds):
    # bf16=True with fp32 weights: accelerate wraps the model's forward in autocast at train start
    # (on top of ours). The guard must see through it, the kernel must run under it, undo must not raise.
    base, _ = train_hf([], tmp_path, tok, lm_ds, steps=4, bf16=True)
    fused, calls = train_hf(["fused_ce"], tmp_path, tok, lm_ds, options=TORCH, steps=4, bf16=True)
    assert calls == {"labels": 4}
    assert_losses_close(base, fused, rel=2e-2)  # bf16 logits: the two heads round differently
    base = train_sft([], tmp_path, tok, sft_ds, steps=4, bf16=True)[0]
    fused, calls, trainer, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, options=TORCH, steps=4, bf16=True)
    assert calls == {"fused_lm_head": 4}
    assert_losses_close(base, fused, rel=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_sft_parity(tmp_path, tok, sft_ds):
    from sft_plugins.embedded import build_model

    def make():
        return build_model(tokenizer=tok, dtype=torch.bfloat16)

    over = dict(use_cpu=False, bf16=True)
    base = train_sft([], tmp_path, tok, sft_ds, model=make(), steps=10, **over)[0]
    fused, calls, _, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, model=make(), steps=10, **over)
    assert calls == {"fused_lm_head": 10}
    assert_losses_close(base, fused, rel=2e-2)  # bf16: the two heads round differently


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp32_trainer_parity_20_steps(tmp_path, tok, lm_ds, backends_used):
    base, _ = train_hf([], tmp_path, tok, lm_ds, use_cpu=False)
    fused, calls = train_hf(["fused_ce"], tmp_path, tok, lm_ds, use_cpu=False)
    assert calls == {"labels": 20} and set(backends_used) == {"triton"}
    assert_losses_close(base, fused)
