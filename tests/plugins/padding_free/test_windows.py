"""padding_free on sliding-window and softcapped attention (Mistral, Gemma2, Gemma3 shapes): every packed
sequence gets exactly the logits it gets alone, through the packed attention's own backends."""

from __future__ import annotations

import pytest
import torch

from sft_plugins.plugins.padding_free import attention as pa
from sft_plugins.plugins.shared import PackedCollator

VOCAB = 256


def _config(kind: str, window: int):
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, attention_dropout=0.0,
                  pad_token_id=0)
    if kind == "mistral":
        return MistralConfig(sliding_window=window, **common)
    if kind == "gemma2":
        return Gemma2Config(sliding_window=window, attn_logit_softcapping=0.5, final_logit_softcapping=30.0,  # small: the softcap must bite
                            query_pre_attn_scalar=16, **common)
    return Gemma3TextConfig(sliding_window=window, query_pre_attn_scalar=16,
                            layer_types=["sliding_attention", "full_attention"], **common)


def _model(kind: str, window: int, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(kind, window), attn_implementation="eager", dtype=dtype)
    return model.to(device).eval()


def _sequences(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def _packed_vs_alone(model, seqs, backend):
    device = next(model.parameters()).device
    batch = PackedCollator(pad_token_id=0)([{"input_ids": s.tolist()} for s in seqs])
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad():
        alone = [model(input_ids=s[None].to(device), use_cache=False).logits[0].float() for s in seqs]
        undo = pa.install(model, backend)
        try:
            packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0].float()
        finally:
            undo()
    return packed, torch.cat(alone)


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gemma3"])
@pytest.mark.parametrize("window", [6, 4096])  # a window shorter than the sequences, and one that is no window
def test_loop_backend_matches_each_sequence_alone(kind, window):
    model = _model(kind, window)
    packed, alone = _packed_vs_alone(model, _sequences([23, 9, 31, 5]), "loop")
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=2e-5)


def test_plugin_accepts_sliding_window_models_on_auto():
    import sft_plugins

    for kind in ("mistral", "gemma2", "gemma3"):
        model = _model(kind, 4096)
        stack = sft_plugins.compose(["padding_free"], options={"padding_free": {"attention": "loop"}})
        stack.prepare(model=model)  # no refusal: windows and softcaps are handled
        assert model.config._attn_implementation == "sft_packed_loop"
        stack.undo()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gemma3"])
@pytest.mark.parametrize("backend", ["varlen", "flex"])
@pytest.mark.parametrize("window", [64, 4096])
def test_gpu_backends_match_each_sequence_alone(kind, backend, window):
    """bf16 on the GPU, without flash-attn: the varlen kernel (window through window_size; softcap routed
    to FlexAttention) and FlexAttention (window in the block mask, softcap as a score_mod) give every
    sequence the logits of the eager model run on it alone, within bf16 rounding."""
    if backend == "varlen" and not pa.varlen_available():
        pytest.skip("torch has no varlen_attn")
    model = _model(kind, window, dtype=torch.bfloat16, device="cuda")
    packed, alone = _packed_vs_alone(model, _sequences([300, 45, 517, 130]), backend)
    assert not {k: v for k, v in pa.KERNEL_PROBES.items() if v}, pa.KERNEL_PROBES
    # bf16 rounding only: the largest error a few bf16 ulps of the logits' scale (a random model's logits are
    # nearly tied, so the argmax is no criterion here: it flips on 1-2% of tokens between any two kernels)
    err = (packed - alone).abs().max().item()
    scale = alone.abs().max().item()
    assert err <= 2e-2 * scale, (err, scale)
