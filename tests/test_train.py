"""``sft-plugins train --config``: a TRL ``trl sft`` YAML plus ``plugins:``, on a local model and a local jsonl of
chat messages; the adapter and tokenizer are saved and reload; a resumed run continues the same trajectory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml


@pytest.fixture(scope="module")
def local_run(local_model_and_chat):
    return local_model_and_chat[0].parent


def _config(root, out, **extra):
    # the shape of TRL's documented `trl sft --config` YAML, plus our two keys
    config = {
        "model_name_or_path": str(root / "model"),
        "dataset_name": str(root / "chat.jsonl"),
        "learning_rate": 1.0e-3,
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_length": 128,
        "logging_steps": 1,
        "save_steps": 3,
        "seed": 0,
        "output_dir": str(out),
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "use_peft": True,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_target_modules": "all-linear",
        "plugins": ["fused_ce", "padding_free"],
        "plugin_options": {"padding_free": {"attention": "loop"}},
        **extra,
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(*args):
    run = subprocess.run([sys.executable, "-m", "sft_plugins.cli", "train", *map(str, args)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _losses(checkpoint):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {r["step"]: r["loss"] for r in state["log_history"] if "loss" in r}


def test_train_config_saves_adapter_and_tokenizer_that_reload(local_run, tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    _train("--config", _config(local_run, out))
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    record = json.loads((out / "sft_plugins.json").read_text())
    assert record["plugins"] == ["fused_ce", "padding_free"] and record["plugin_options"]["padding_free"]["attention"] == "loop"
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    ids = tok("hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    trained_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained_b and any(p.abs().sum() > 0 for p in trained_b)  # B starts at zero: it learned


def test_flags_override_the_file(local_run, tmp_path):
    out = tmp_path / "flags"
    _train("--config", _config(local_run, out), "--max_steps", "2", "--plugins", "padding_free",
           "--plugin_options", '{"padding_free": {"attention": "loop"}}')
    assert max(_losses(out / "checkpoint-2")) == 2
    assert json.loads((out / "sft_plugins.json").read_text())["plugins"] == ["padding_free"]


def test_resume_from_checkpoint_continues_the_same_trajectory(local_run, tmp_path):
    full = tmp_path / "full"
    _train("--config", _config(local_run, full))
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(full / "checkpoint-3", cut / "checkpoint-3")  # a run stopped after its step-3 save
    _train("--config", _config(local_run, cut), "--resume_from_checkpoint", cut / "checkpoint-3")
    want, got = _losses(full / "checkpoint-6"), _losses(cut / "checkpoint-6")
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


@pytest.mark.parametrize("text, message", [
    ("learning_rate: 1e-4\nwarmup_ratio: 0.1\n", "did you mean 'warmup_steps'"),
    ("learning_rate: [1e-4\n", "invalid YAML at line"),
])
def test_bad_config_is_one_line_with_the_fix(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    run = subprocess.run([sys.executable, "-m", "sft_plugins.cli", "train", "--config", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr


def test_bad_json_config_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "learning_rate": 1e-4,\n  "plugins": ["fused_ce",]\n}\n')
    run = subprocess.run([sys.executable, "-m", "sft_plugins.cli", "train", "--config", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "invalid JSON at line 3, column" in run.stderr


def _train_offline(tmp_path, keys, **env):
    """``sft-plugins train`` with HF_HUB_OFFLINE=1 on a YAML of ``keys`` (CPU): the run and its seconds."""
    import os
    import time

    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump({**keys, "output_dir": str(tmp_path / "o"), "use_cpu": True, "bf16": False}))
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "sft_plugins.cli", "train", "--config", str(path)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    return run, time.monotonic() - start


def test_offline_hub_id_fails_fast(tmp_path):
    run, seconds = _train_offline(tmp_path, {"model_name_or_path": "org/not-a-local-model"})
    assert run.returncode == 2 and "HF_HUB_OFFLINE" in run.stderr and "local path" in run.stderr
    assert seconds < 30


def test_offline_hub_dataset_is_looked_up_in_the_cache_and_fails_fast(tmp_path):
    """Offline, a dataset name is tried in the Hugging Face cache (as datasets does); absent there, one line."""
    run, seconds = _train_offline(tmp_path, {"dataset_name": "org/not-a-cached-dataset"},
                                  HF_HOME=str(tmp_path / "hf"))
    assert run.returncode == 2, run.stderr[-2000:]
    assert "not in the Hugging Face cache" in run.stderr and "local path" in run.stderr
    assert "Traceback" not in run.stderr and seconds < 60


def test_qlora_example_runs_on_the_embedded_model(tmp_path):
    """examples/qlora_sft.yaml (4-bit NF4 base, LoRA, adamw_8bit, four plugins) as printed, on the embedded
    model and a CPU: bitsandbytes quantises it, the plugins compose, the adapter is saved."""
    import pathlib

    repo = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "qlora"
    run = subprocess.run([sys.executable, "-m", "sft_plugins.cli", "train", "--config", "examples/qlora_sft.yaml",
                          "--model_name_or_path", "tiny", "--dtype", "float32", "--max_steps", "2", "--max_length",
                          "256", "--gradient_accumulation_steps", "1", "--output_dir", str(out), "--use_cpu", "true"],
                         capture_output=True, text=True, timeout=600, cwd=repo)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((out / "sft_plugins.json").read_text())
    assert record["plugins"] == ["fused_ce", "smart_checkpointing", "padding_free", "adamw_8bit"]
    assert (out / "adapter_model.safetensors").exists()


def test_qlora_python_example_runs_on_the_embedded_model(tmp_path):
    """examples/qlora_sft.py (the same recipe in Python) on the embedded model and a CPU: the adapter it saves
    reloads onto a fresh 4-bit base."""
    import pathlib

    repo = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "qlora_py"
    run = subprocess.run([sys.executable, "examples/qlora_sft.py", "--model", "tiny", "--max-steps", "2",
                          "--output-dir", str(out)], capture_output=True, text=True, timeout=600, cwd=repo)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "plugins=['fused_ce', 'smart_checkpointing', 'padding_free', 'adamw_8bit'] final train loss" in run.stdout
    from peft import PeftModel

    sys.path.insert(0, str(repo / "examples"))
    try:
        from qlora_sft import load_4bit
    finally:
        sys.path.pop(0)
    import torch

    base, _ = load_4bit("tiny", torch.float32)
    model = PeftModel.from_pretrained(base, out)
    assert any("lora_A" in n for n, _ in model.named_parameters())
