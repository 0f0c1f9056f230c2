"""fused_ce's forward against the model's own: loss and the gradient of every trainable parameter equal,
across architectures (Qwen2 / Mistral / Gemma-2 softcap / Granite and Cohere logit scale), with
pre-shifted labels, num_items_in_batch normalisation and tied embeddings; and short SFT runs per
architecture."""

from __future__ import annotations

import copy

import pytest
import torch

import sft_plugins
from sft_plugins.embedded import build_model

from .helpers import ARCHS, TORCH, assert_forward_parity, assert_losses_close, make_batch, tiny, train_hf, train_sft


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architectures_forward_parity(arch):
    # default backend: the Triton kernel (interpreter on CPU)
    assert_forward_parity(tiny(arch, **ARCHS[arch]))


def test_shift_labels_as_hf():
    # context parallelism passes pre-shifted labels: scored without shifting, exactly as HF does
    model = tiny("llama")
    ref = copy.deepcopy(model)
    batch = make_batch(512)
    shift = batch["labels"].roll(3, dims=1)  # any labels: they must be scored position by position
    ref.train()
    want = ref(**batch, shift_labels=shift).loss
    with sft_plugins.compose(["fused_ce"], options=TORCH) as stack:
        stack.prepare(model=model)
        model.train()
        got = model(**batch, shift_labels=shift).loss
        plain = model(**batch).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert abs(float(plain.detach()) - float(got.detach())) > 1e-3  # the shift_labels path really differs


def test_num_items_in_batch_normalisation():
    assert_forward_parity(tiny("llama"), options=TORCH, num_items=37)


def test_tied_embeddings_forward_parity_and_training(tmp_path, tok, lm_ds):
    model = build_model(tokenizer=tok, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    g = assert_forward_parity(model, options=TORCH)
    assert "model.embed_tokens.weight" in g  # one parameter, both uses' gradients
    base, _ = train_hf([], tmp_path, tok, lm_ds, model=build_model(tokenizer=tok, tie_word_embeddings=True),
                       steps=5)
    fused, _ = train_hf(["fused_ce"], tmp_path, tok, lm_ds, options=TORCH, steps=5,
                        model=build_model(tokenizer=tok, tie_word_embeddings=True))
    assert_losses_close(base, fused)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma2"])
def test_architectures_sft_training_parity(tmp_path, tok, sft_ds, arch):
    def make():
        return tiny(arch, **ARCHS[arch])

    base = train_sft([], tmp_path, tok, sft_ds, model=make(), steps=5)[0]
    fused, calls, _, _ = train_sft(["fused_ce"], tmp_path, tok, sft_ds, model=make(), options=TORCH, steps=5)
    assert calls == {"fused_lm_head": 5}
    assert_losses_close(base, fused)
    assert_losses_close(base, fused, key="entropy")
