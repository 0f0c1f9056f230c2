"""adamw_8bit as a plugin: every unsupported setup raises PluginError naming the fix (bad options at compose(),
the rest at prepare()), HF's own AdamW names are accepted, and listing it imports neither torch nor
bitsandbytes."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

import sft_plugins
from sft_plugins import PluginError
from sft_plugins.embedded import build_model

bnb = pytest.importorskip("bitsandbytes")
torch = pytest.importorskip("torch")

from sft_plugins.plugins import adamw_8bit  # noqa: E402

from .helpers import options, sft_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_refuses_user_optimizers(tmp_path, tok):
    model = build_model(tokenizer=tok)
    args = sft_args(tmp_path)
    with pytest.raises(PluginError, match="optimizers="):
        sft_plugins.compose(["adamw_8bit"]).prepare(
            model=model, args=args, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(PluginError, match="optimizer_cls_and_kwargs="):
        sft_plugins.compose(["adamw_8bit"]).prepare(
            model=model, args=args, optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}))


@pytest.mark.parametrize("optim,fix", [("adafactor", "leave optim at its default"),
                                       ("paged_adamw_8bit", "paged")])
def test_refuses_other_optim(tmp_path, tok, optim, fix):
    with pytest.raises(PluginError, match=fix):
        sft_plugins.compose(["adamw_8bit"]).prepare(model=build_model(tokenizer=tok),
                                                    args=sft_args(tmp_path, optim=optim))


def test_accepts_default_and_hf_8bit_optim(tmp_path, tok):
    for optim in ("adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit"):
        with sft_plugins.compose(["adamw_8bit"]) as stack:
            out = stack.prepare(model=build_model(tokenizer=tok), args=sft_args(tmp_path, optim=optim))
            assert out["optimizer_cls_and_kwargs"][0].__name__ == "AdamW8bitFP32Embeddings"


def test_bad_options_fail_at_compose():
    typo = "bad options for adamw_8bit:(.|\n)*unknown option 'pagd' \\(did you mean 'paged'\\?\\)"
    with pytest.raises(PluginError, match=typo):
        sft_plugins.compose(["adamw_8bit"], options={"adamw_8bit": {"pagd": True}})
    with pytest.raises(PluginError, match="option 'kernel' must be 'triton' \\| 'bitsandbytes', got 'cuda'"):
        sft_plugins.compose(["adamw_8bit"], options={"adamw_8bit": {"kernel": "cuda"}})
    with pytest.raises(PluginError, match="option 'min_8bit_size' must be int >= 1"):
        sft_plugins.compose(["adamw_8bit"], options={"adamw_8bit": {"min_8bit_size": 0}})
    with pytest.raises(PluginError, match="option 'paged' must be bool, got 'yes'"):
        sft_plugins.compose(["adamw_8bit"], options={"adamw_8bit": {"paged": "yes"}})


def test_refuses_missing_args_and_deepspeed(tok, tmp_path):
    with pytest.raises(PluginError, match="args="):
        sft_plugins.compose(["adamw_8bit"]).prepare(model=build_model(tokenizer=tok))
    args = copy.copy(sft_args(tmp_path))  # copy: no __post_init__, so no DeepSpeed import is needed
    args.deepspeed = "ds.json"
    assert any("DeepSpeed" in e for e in adamw_8bit.sft_check(args=args, options=options()))


def test_refuses_missing_bitsandbytes(tmp_path, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(PluginError, match="pip install bitsandbytes"):
        sft_plugins.compose(["adamw_8bit"]).prepare(model=build_model(tokenizer=tok), args=sft_args(tmp_path))


def test_refuses_bitsandbytes_that_cannot_run_here(tmp_path, tok, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb.functional, "optimizer_update_8bit_blockwise", broken)
    with pytest.raises(PluginError, match="cannot step AdamW8bit on cpu.*no kernel.*pip install -U bitsandbytes"):
        sft_plugins.compose(["adamw_8bit"]).prepare(model=build_model(tokenizer=tok), args=sft_args(tmp_path))


def test_describe_and_listing_without_torch():
    info = sft_plugins.available()["adamw_8bit"]
    assert info.ok and info.loss_parity is None and "8-bit" in info.summary
    assert {o.name for o in info.options} == {"paged", "fp32_embeddings", "min_8bit_size", "kernel"}
    code = ("import sys, sft_plugins.plugins.adamw_8bit; "
            "assert 'torch' not in sys.modules and 'bitsandbytes' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
