"""adamw_8bit fixtures: a small prompt/completion set."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def dataset():
    from sft_plugins.embedded import build_dataset

    # short samples: the tiny task stays learnable and each step costs milliseconds
    return build_dataset(256, form="prompt_completion", max_words=12)
