"""smart_checkpointing's patch on the model: undo restores every attribute (and drops the patch from the
model), the refusals name the fix (bad options at compose(), conflicting args and models at prepare()),
and HF's gradient_checkpointing_kwargs are merged."""

from __future__ import annotations

import pytest
import torch

import sft_plugins
from sft_plugins import PluginError
from sft_plugins.plugins import smart_checkpointing as sc
from sft_plugins.plugins.smart_checkpointing.patch import _PATCH_ATTR, patch_of

from .helpers import NAME, make_model, sft

pytestmark = pytest.mark.usefixtures("one_thread")


def _ckpt_state(model):
    return [(name, {k: v for k, v in m.__dict__.items() if k in ("gradient_checkpointing", "_gradient_checkpointing_func")})
            for name, m in model.named_modules()]


def test_undo_restores_the_model_exactly(tok):
    model = make_model(tok)
    model.gradient_checkpointing_enable()  # a user's own HF checkpointing is merged, then given back
    before = _ckpt_state(model)
    stack = sft_plugins.compose([NAME])
    stack.prepare(model=model)
    patch = patch_of(model)
    assert patch is not None and patch.active and patch is stack.state_of(NAME).patch
    assert model.is_gradient_checkpointing
    assert all(getattr(layer._gradient_checkpointing_func, "__qualname__", "").startswith("smart_checkpoint")
               for layer in model.model.layers)
    stack.undo()
    assert _ckpt_state(model) == before
    assert patch_of(model) is None and _PATCH_ATTR not in vars(model) and not patch.active
    with pytest.raises(PluginError):
        sc.stats(model)

    fresh = make_model(tok)
    before = _ckpt_state(fresh)
    with sft_plugins.compose([NAME]) as stack:
        stack.prepare(model=fresh)
        assert patch_of(fresh) is not None and patch_of(model) is None
    assert _ckpt_state(fresh) == before and not fresh.is_gradient_checkpointing
    assert patch_of(fresh) is None and _PATCH_ATTR not in vars(fresh)


def test_one_patch_per_model(tok):
    model = make_model(tok, layers=1)
    with sft_plugins.compose([NAME]) as first:
        first.prepare(model=model)
        # a second stack sees checkpointing functions that are not torch's on the layers, and refuses
        with pytest.raises(PluginError, match="custom checkpointing function .*smart_checkpoint"):
            sft_plugins.compose([NAME]).prepare(model=model)
        assert patch_of(model) is first.state_of(NAME).patch and patch_of(model).intact()
    assert patch_of(model) is None


# -- refusals and merges ----------------------------------------------------------------------------

@pytest.mark.parametrize("args_kw, match", [
    ({"activation_offloading": True}, "activation_offloading"),
    ({"gradient_checkpointing_kwargs": {"selective": True}}, "selective"),
    ({"gradient_checkpointing_kwargs": {"offload": False}}, "offload=False"),
    ({"gradient_checkpointing_kwargs": {"determinism_check": "none"}}, "determinism_check"),
])
def test_refuses_conflicting_args(tok, args_kw, match):
    with pytest.raises(PluginError, match=match):
        sft(tok, [NAME], args_kw=args_kw)


@pytest.mark.parametrize("options, match", [
    ({"offload": "yes"}, "option 'offload' must be"), ({"keep_last_on_gpu": -1}, "option 'keep_last_on_gpu' must be"),
    ({"overflow": "disk"}, "option 'overflow' must be"), ({"budget": 1}, "unknown option 'budget'"),
    ({"prefetch": -1}, "option 'prefetch' must be"), ({"host_budget_gb": "big"}, "option 'host_budget_gb' must be"),
])
def test_refuses_bad_options_at_compose(options, match):
    with pytest.raises(PluginError, match=f"bad options for {NAME}:(.|\n)*{match}"):
        sft_plugins.compose([NAME], options={NAME: options})


def test_refuses_models_it_cannot_checkpoint_and_foreign_patches(tok):
    with pytest.raises(PluginError, match="GradientCheckpointingLayer"):
        sft_plugins.compose([NAME]).prepare(model=torch.nn.Linear(2, 2))
    model = make_model(tok, layers=1)
    model.model.layers[0]._gradient_checkpointing_func = lambda f, *a, **k: f(*a, **k)
    with pytest.raises(PluginError, match="custom checkpointing"):
        sft_plugins.compose([NAME]).prepare(model=model)
    assert patch_of(model) is None


def test_refuses_a_plugin_that_wants_hf_checkpointing(tok):
    from trl import SFTConfig

    from sft_plugins import hookimpl

    class WantsHF:
        @hookimpl
        def sft_update_args(self):
            return {"gradient_checkpointing": True}

    stack = sft_plugins.compose([NAME, "other"], plugins={"other": WantsHF()})
    with pytest.raises(PluginError, match="cannot be composed"):
        stack.prepare(model=make_model(tok, layers=1), args=SFTConfig(output_dir="/tmp/x", use_cpu=True, bf16=False,
                                                                      report_to="none"))


def test_merges_hf_checkpointing_kwargs(tok):
    from trl import SFTConfig

    args = SFTConfig(output_dir="/tmp/x", use_cpu=True, bf16=False, report_to="none",
                     gradient_checkpointing_kwargs={"use_reentrant": True, "every_n_layers": 2,
                                                    "preserve_rng_state": False})
    model = make_model(tok, layers=3)
    with sft_plugins.compose([NAME]) as stack:
        out = stack.prepare(model=model, args=args)
        assert not out["args"].gradient_checkpointing and args.gradient_checkpointing  # user's args untouched
        flags = [layer.gradient_checkpointing for layer in model.model.layers]
        assert flags == [True, False, True]
        assert patch_of(model).offloader.config.preserve_rng_state is False
