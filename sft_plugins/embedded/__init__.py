"""The embedded default: a tiny Llama built from a config, a tokenizer built in code, and a
generated SFT dataset. Hub-free and deterministic: the same seed gives the same run anywhere.
"""

from ._data import FORMS, LONG_TAIL, build_dataset, build_token_dataset, generate_pairs, records
from ._model import PRESETS, SMOLLM2, build_config, build_model, load_smollm2, smollm2_gguf
from ._tokenizer import CHAT_TEMPLATE, build_tokenizer

__all__ = [
    "CHAT_TEMPLATE", "FORMS", "LONG_TAIL", "PRESETS", "SMOLLM2", "build_config", "build_dataset", "build_model",
    "build_token_dataset", "build_tokenizer", "generate_pairs", "load_smollm2", "records", "smollm2_gguf",
]
