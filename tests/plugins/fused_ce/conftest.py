"""fused_ce fixtures: datasets, the kernel backends that ran, and the check that no test leaves a patch
(on a model, or TRL's ``add_fused_lm_head`` intercepted) behind."""

from __future__ import annotations

import weakref

import pytest


@pytest.fixture(scope="module")
def sft_ds():
    from sft_plugins.embedded import build_dataset

    return build_dataset(96, form="prompt_completion", max_words=8)


@pytest.fixture(scope="module")
def lm_ds(tok):
    from datasets import Dataset

    from sft_plugins.embedded import records

    texts = [r["text"] for r in records(96, form="text", max_words=8)]
    return Dataset.from_dict(dict(tok(texts, truncation=True, max_length=32)))


@pytest.fixture
def backends_used(monkeypatch):
    """The kernel backends (row functions) that ran: proves which path was exercised."""
    from sft_plugins.kernels import _function

    used: list[str] = []
    original = _function._row_fn

    def spy(backend: str):
        used.append(backend)
        return original(backend)

    monkeypatch.setattr(_function, "_row_fn", spy)
    return used


@pytest.fixture(autouse=True)
def _nothing_left_behind(monkeypatch):
    """Every model fused_ce patched during the test is unpatched afterwards (no patch attribute, the
    patch inactive), and SFTTrainer's ``add_fused_lm_head`` is TRL's own function again."""
    import trl.trainer.sft_trainer as sft_mod
    import trl.trainer.utils as trl_utils

    from sft_plugins.plugins.fused_ce import patch as fused_patch

    assert sft_mod.add_fused_lm_head is trl_utils.add_fused_lm_head, "an earlier test left TRL's head intercepted"
    patched: list[tuple[weakref.ref, object]] = []
    apply_patch = fused_patch.apply_patch

    def recording_apply_patch(base, options):
        patch, undo = apply_patch(base, options)
        patched.append((weakref.ref(base), patch))
        return patch, undo

    monkeypatch.setattr(fused_patch, "apply_patch", recording_apply_patch)
    yield patched
    for ref, patch in patched:
        assert not patch.active, "a test left a fused_ce patch active"
        base = ref()
        if base is not None:
            assert fused_patch._PATCH_ATTR not in vars(base), "a test left a fused_ce patch on a model"
            assert fused_patch.patch_of_base(base) is None
    assert not isinstance(sft_mod.add_fused_lm_head, fused_patch.TrlHeadInterceptor)
    assert sft_mod.add_fused_lm_head is trl_utils.add_fused_lm_head
