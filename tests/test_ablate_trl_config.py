"""``sft-plugins ablate --config`` on a `trl sft` YAML: the same file ``sft-plugins train`` takes; every arm
trains the user's workload, and the report records every key the file sets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from sft_plugins.ablate import ConfigError, make_config
from sft_plugins.ablate._config import load_yaml, parse_args


@pytest.fixture(scope="module")
def trl_yaml(local_model_and_chat, tmp_path_factory):
    model_dir, chat = local_model_and_chat
    root = tmp_path_factory.mktemp("abl")
    config = {"model_name_or_path": str(model_dir), "dataset_name": str(chat),
              "learning_rate": 5.0e-4, "lr_scheduler_type": "constant", "max_steps": 3,
              "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_length": 96,
              "assistant_only_loss": True, "seed": 3,
              "use_cpu": True, "bf16": False, "report_to": "none", "output_dir": str(root / "unused"),
              "use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_target_modules": "all-linear",
              "plugins": ["padding_free", "fused_ce"], "plugin_options": {"padding_free": {"attention": "loop"}}}
    path = root / "sft.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, config


def test_trl_yaml_becomes_the_ablation_workload(trl_yaml):
    path, config = trl_yaml
    values = load_yaml(path)
    assert values["trl_config"] == str(path.resolve()) and values["trl_values"] == config
    cfg = make_config(values)
    assert (cfg.steps, cfg.batch_size, cfg.max_length, cfg.seed, cfg.lora) == (3, 2, 96, 3, True)
    # the header names the file's dataset, LoRA and accumulation, not ablate's defaults
    assert (cfg.dataset, cfg.lora_r, cfg.lora_alpha, cfg.grad_accum) == (str(config["dataset_name"]), 4, 8, 2)
    assert cfg.config_plugins == ["padding_free", "fused_ce"]


def test_ablate_config_runs_the_users_setup_and_records_every_key(trl_yaml, tmp_path):
    path, config = trl_yaml
    out = tmp_path / "report"
    run = subprocess.run([sys.executable, "-m", "sft_plugins.cli", "ablate", "--config", str(path), "--arms",
                          "padding_free", "--output-dir", str(out), "--learning_rate", "6e-4"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [a["name"] for a in results["arms"]] == ["baseline", "padding_free"]
    assert all(a["status"] == "ok" and len(a["steps"]) == 3 for a in results["arms"])
    assert results["config"]["trl_values"] == config
    report = (out / "report.md").read_text()
    header = report.splitlines()[2]  # the workload's first line names the file's dataset, LoRA and batch
    assert f"dataset `{config['dataset_name']}`" in header and "LoRA r=4" in header, header
    assert "batch 2 × grad-accum 2" in header, header
    for key, value in config.items():  # every field the file sets, with its value
        assert f"| `{key}` | `{json.dumps(value)}` |" in report
    assert "Overridden by the flags `--learning_rate 6e-4`." in report
    spec = json.loads((out / "arms" / "padding_free" / "spec.json").read_text())
    assert spec["trl_config"] == str(path.resolve()) and spec["trl_flags"] == ["--learning_rate", "6e-4"]
    assert results["config"]["lr"] == 6e-4
    assert results["arms"][1]["parity"]["verdict"] == "pass"


def test_trl_flags_override_the_file_as_on_train(trl_yaml, tmp_path):
    path, _ = trl_yaml
    cfg = parse_args(["--config", str(path), "--steps", "2", "--lora_r", "8", "--learning_rate", "1e-4"])
    assert (cfg.steps, cfg.lora_r, cfg.lr, cfg.trl_flags) == (2, 8, 1e-4, ["--lora_r", "8", "--learning_rate", "1e-4"])
    with pytest.raises(ConfigError, match="learnin_rate"):  # a misspelt TRL flag is refused, not dropped
        parse_args(["--config", str(path), "--learnin_rate", "1e-4"])
    with pytest.raises(ConfigError, match="unrecognized arguments: --learning_rate"):  # no `trl sft` file
        parse_args(["--steps", "2", "--learning_rate", "1e-4"])
    # ablate's own workload flags mean the same `trl sft` flags there, so the arms see them too
    cfg = parse_args(["--config", str(path), "--lr", "3e-4", "--seed", "7", "--batch-size", "4", "--full"])
    assert (cfg.lr, cfg.seed, cfg.batch_size, cfg.lora) == (3e-4, 7, 4, False)
    assert cfg.trl_flags == ["--use_peft", "false", "--per_device_train_batch_size", "4", "--learning_rate", "0.0003",
                             "--seed", "7"]
    with pytest.raises(ConfigError, match="--dataset-size does not apply"):
        parse_args(["--config", str(path), "--dataset-size", "5"])
    own = tmp_path / "own.yaml"
    own.write_text("steps: 2\n")
    with pytest.raises(ConfigError, match="apply only with a `trl sft` config"):
        parse_args(["--config", str(own), "--learning_rate", "1e-4"])


def test_arms_named_twice_are_refused():
    with pytest.raises(ConfigError, match="named twice"):
        from sft_plugins.ablate._runner import load_locals, plan_arms, plugin_infos

        config = make_config(arms=["fused_ce", "fused_ce"])
        plan_arms(config, plugin_infos(load_locals(config)), {})


def test_unknown_trl_key_names_the_closest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model_name_or_path: tiny\nlearning_rat: 1e-4\n")
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_yaml(path)


def test_gpu_default_workload_only_when_nothing_was_named():
    from sft_plugins.ablate import with_device_workload
    from sft_plugins.ablate._config import GPU_WORKLOAD

    gpu = with_device_workload(make_config(), cuda=True)
    assert {k: getattr(gpu, k) for k in GPU_WORKLOAD} == GPU_WORKLOAD and gpu.max_length >= 2048 and gpu.lora
    assert with_device_workload(make_config(), cuda=False).model == "tiny"
    assert with_device_workload(make_config(model="tiny"), cuda=True).model == "tiny"  # the user's choice wins
    assert with_device_workload(make_config(device="cpu"), cuda=True).model == "tiny"


def test_long_tail_dataset_lengths():
    import numpy as np

    from sft_plugins.embedded import build_token_dataset

    lengths = np.array([len(r) for r in build_token_dataset(2000, max_length=2048)["input_ids"]])
    assert lengths.min() >= 24 and lengths.max() == 2048 and 250 < np.median(lengths) < 420
