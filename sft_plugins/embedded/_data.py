"""A small, learnable SFT dataset generated from a seed: four string tasks with long-tailed lengths.

Long-tailed lengths (lognormal) make padding waste real, so padding-free and packing have something to
show; the tasks (copy, reverse, sort, add) are learnable by a tiny model within tens of steps.
"""

from __future__ import annotations

import math
import random
from typing import Any

WORDS = (
    "apple river stone cloud green quick light north table paper seven orange window silver planet "
    "garden yellow winter summer forest bridge castle ocean mountain valley desert island market "
    "candle pencil rocket thunder violet purple copper golden marble shadow meadow harbor lantern"
).split()

FORMS = ("conversational", "prompt_completion", "text")


def _lognormal_length(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    return max(1, min(cap, int(round(math.exp(rng.gauss(math.log(median), sigma))))))


def _example(rng: random.Random, max_words: int) -> tuple[str, str]:
    task = rng.randrange(4)
    if task == 0:
        words = [rng.choice(WORDS) for _ in range(_lognormal_length(rng, 12, 0.9, max_words))]
        return "Copy: " + " ".join(words), " ".join(words)
    if task == 1:
        words = [rng.choice(WORDS) for _ in range(_lognormal_length(rng, 6, 0.7, max_words))]
        return "Reverse: " + " ".join(words), " ".join(reversed(words))
    if task == 2:
        nums = [rng.randrange(100) for _ in range(_lognormal_length(rng, 6, 0.6, max_words))]
        return "Sort: " + " ".join(map(str, nums)), " ".join(map(str, sorted(nums)))
    a, b = rng.randrange(1000), rng.randrange(1000)
    return f"Add {a} and {b}.", str(a + b)


def generate_pairs(n: int, seed: int = 0, max_words: int = 120) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs, the same for the same seed on every machine."""
    rng = random.Random(seed)
    return [_example(rng, max_words) for _ in range(n)]


def corpus(n: int = 400, seed: int = 1234) -> list[str]:
    """Text the bundled tokenizer is trained on (a different seed from the training data)."""
    return [f"{p}\n{a}" for p, a in generate_pairs(n, seed)]


def records(n: int, form: str = "conversational", seed: int = 0, max_words: int = 120) -> list[dict[str, Any]]:
    """The dataset as plain records in one of TRL's standard forms."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    pairs = generate_pairs(n, seed, max_words)
    if form == "conversational":
        return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
                for p, a in pairs]
    if form == "prompt_completion":
        return [{"prompt": p + "\n", "completion": a} for p, a in pairs]
    return [{"text": f"{p}\n{a}"} for p, a in pairs]


def build_dataset(n: int = 512, form: str = "conversational", seed: int = 0, max_words: int = 120):
    """The generated dataset as a ``datasets.Dataset``."""
    from datasets import Dataset

    return Dataset.from_list(records(n, form, seed, max_words))


LONG_TAIL = "long-tail"


def build_token_dataset(n: int, max_length: int = 2048, vocab_size: int = 512, seed: int = 0, *, low_id: int = 3,
                        high_id: int | None = None, fixed_length: int | None = None):
    """A pre-tokenized dataset with SFT-like, long-tailed lengths: lognormal (median ~330 tokens, sigma 0.8)
    clipped to [24, max_length] (or all ``fixed_length`` long, with no length draw), random ids in
    [low_id, high_id or vocab_size). For GPU measurements, where ~30-token examples would time the host, not
    the plugins; every token is a label (full-sequence loss)."""
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    if fixed_length:
        lengths = np.full(n, fixed_length, dtype=int)
    else:
        lengths = np.clip(rng.lognormal(mean=5.8, sigma=0.8, size=n), 24, max_length).astype(int)
    high = vocab_size if high_id is None else high_id
    return Dataset.from_dict({"input_ids": [rng.integers(low_id, high, size=int(k)).tolist() for k in lengths]})
