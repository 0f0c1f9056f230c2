"""The embedded default: a tiny Llama built from a config, a tokenizer built in code, and a
generated SFT dataset. Hub-free and deterministic: the same seed gives the same run anywhere.
"""

from ._data import FORMS, build_dataset, generate_pairs, records
from ._model import PRESETS, SMOLLM2, build_config, build_model, load_smollm2, smollm2_gguf
from ._tokenizer import CHAT_TEMPLATE, build_tokenizer

__all__ = [
    "CHAT_TEMPLATE", "FORMS", "PRESETS", "SMOLLM2", "build_config", "build_dataset", "build_model",
    "build_tokenizer", "generate_pairs", "load_smollm2", "records", "smollm2_gguf",
]
