"""The example third-party package (examples/third_party_plugin), pip-installed into this environment,
is discovered through the entry-point group, listed, composed, and its hooks fire in real training."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

import sft_plugins

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "third_party_plugin"


@pytest.fixture(scope="module")
def installed():
    if importlib.util.find_spec("sft_plugins_nan_guard") is None:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", str(EXAMPLE)]
        if importlib.util.find_spec("setuptools") is not None:
            cmd.insert(5, "--no-build-isolation")
        subprocess.run(cmd, check=True)
    sft_plugins.refresh()
    yield
    sft_plugins.refresh()


def test_listed(installed):
    info = sft_plugins.available()["nan_guard"]
    assert info.ok and info.source == "entry point"
    assert (info.distribution, info.version) == ("sft-plugins-nan-guard", "0.1.0")
    assert set(info.hooks) >= {"sft_callbacks", "sft_update_args"}
    out = subprocess.run([sys.executable, "-m", "sft_plugins.cli", "list", "--json"], capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout)["nan_guard"]["distribution"] == "sft-plugins-nan-guard"


def test_composed_and_fires_in_training(installed, tmp_path):
    from trl import SFTConfig, SFTTrainer

    from sft_plugins.embedded import build_dataset, build_model, build_tokenizer

    tok = build_tokenizer()
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, bf16=False,
                     use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, max_length=128)
    with sft_plugins.compose(["nan_guard"]) as stack:
        kwargs = stack.prepare(model=build_model(tokenizer=tok), args=args, train_dataset=build_dataset(32),
                               processing_class=tok)
        trainer = SFTTrainer(**kwargs)
        trainer.train()
    guard = next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "NanGuardCallback")
    assert trainer.args.logging_nan_inf_filter is False and args.logging_nan_inf_filter is True
    assert guard.checked == 4 and guard.tripped_at is None
