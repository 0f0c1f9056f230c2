"""`sft-plugins ablate`: the default end to end, the parity verdict, failing arms, bad options, YAML.

Every arm is a fresh process (~10 s of imports on the 2-core CPU), so runs here use few, small steps.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

import sft_plugins
from sft_plugins.ablate import ConfigError, main
from sft_plugins.ablate._config import BF16_PARITY_FLOOR, parse_args
from sft_plugins.ablate._report import parity, summarize

TESTS = pathlib.Path(__file__).parent
if str(TESTS) not in sys.path:  # ablate_plugins must import here (and so in the children) in any import mode
    sys.path.insert(0, str(TESTS))
SMALL = ["--steps", "4", "--batch-size", "4", "--max-length", "128", "--skip-steps", "1"]


def _results(out: pathlib.Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _arms(results: dict) -> dict[str, dict]:
    return {a["name"]: a for a in results["arms"]}


def test_default_ablation_end_to_end(tmp_path, capsys):
    """No arm options: baseline + every built-in plugin (skipped with its error when it does not load)."""
    out = tmp_path / "run"
    code = main([*SMALL, "--output-dir", str(out)])
    results = _results(out)
    arms = _arms(results)
    builtins = {n: i for n, i in sft_plugins.available().items() if i.source == "builtin"}
    assert list(arms)[0] == "baseline" and set(arms) == {"baseline", *builtins}
    for name, info in builtins.items():
        if info.ok:
            assert arms[name]["status"] in ("ok", "failed"), arms[name].get("error")
        else:
            assert arms[name]["status"] == "skipped" and info.error in arms[name]["error"]
    base = arms["baseline"]
    assert base["status"] == "ok", base.get("error_tail")
    assert [s["step"] for s in base["steps"]] == [1, 2, 3, 4]
    for step in base["steps"]:
        assert step["loss"] > 0 and step["tokens"] > 0 and step["time_s"] > 0 and step["peak_memory_bytes"] > 0
    summary = base["summary"]
    assert summary["tokens_per_s"] > 0 and summary["timed_steps"] == 3 and summary["speedup"] == pytest.approx(1.0)
    assert code == (1 if any(a["status"] not in ("ok", "skipped") for a in arms.values()) else 0)
    for name in ("loss", "throughput", "memory"):
        png = out / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "| baseline |" in report and "loss.png" in report
    stdout = capsys.readouterr().out
    assert "baseline" in stdout and "tok/s" in stdout  # the terminal table
    # padded and padding-free batches of the same samples count the same tokens
    if arms.get("padding_free", {}).get("status") == "ok":
        assert [s["tokens"] for s in arms["padding_free"]["steps"]] == [s["tokens"] for s in base["steps"]]


def test_parity_verdict_and_failing_arms(tmp_path):
    """A plugin promising parity but changing the loss fails the verdict; crashing arms (an exception,
    and a process that dies) are reported while the other arms complete. Runs plain transformers.Trainer
    (the default test covers TRL's SFTTrainer)."""
    out = tmp_path / "run"
    loads = ["--load", "lr_boost=ablate_plugins:LrBoost", 
             "--load", "crash=ablate_plugins:Crash", "--load", "hard_crash=ablate_plugins:HardCrash"]
    code = main([*SMALL, *loads, "--arms", "crash,lr_boost,hard_crash", "--no-preflight", "--trainer", "hf",
                 "--repeat-baseline", "--output-dir", str(out)])
    assert code == 1  # some arm failed; the results are written all the same
    results = _results(out)
    arms = _arms(results)
    assert list(arms) == ["baseline", "crash", "lr_boost", "hard_crash"]
    again = results["baseline_again"]  # the baseline once more, last: same losses, its speed drift measured
    assert again["status"] == "ok" and again["max_rel_loss_diff"] == 0 and again["drift"] is not None
    assert (out / "arms" / "baseline-again" / "result.json").is_file()
    assert "**baseline again**" in (out / "report.md").read_text()

    assert arms["lr_boost"]["status"] == "ok"
    lr = arms["lr_boost"]["parity"]
    assert lr["promised"] == 1e-3 and lr["verdict"] == "fail" and lr["max_rel_diff"] > 1e-3
    assert arms["lr_boost"]["steps"][0]["loss"] == arms["baseline"]["steps"][0]["loss"]  # same start

    crash = arms["crash"]
    assert crash["status"] == "failed" and "deliberate crash at step 2" in crash["error"]
    assert crash["exit_code"] == 1 and [s["step"] for s in crash["steps"]] == [1]
    hard = arms["hard_crash"]
    assert hard["status"] == "failed" and hard["exit_code"] == 17 and "exit code 17" in hard["error"]
    report = (out / "report.md").read_text()
    assert "deliberate crash" in report and "✗" in report


def _one_line_error(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sft-plugins ablate: error:"), err
    assert needle in err, err


def test_bad_options_exit_with_one_line(tmp_path, capsys):
    out = ["--output-dir", str(tmp_path / "out")]
    _one_line_error(capsys, ["--arms", "fused_ce,no_such_plugin", *out], "unknown plugin 'no_such_plugin'")
    _one_line_error(capsys, ["--dataset", str(tmp_path / "missing.jsonl"), *out], "does not exist")
    _one_line_error(capsys, ["--steps", "0", *out], "steps must be a positive integer")
    _one_line_error(capsys, ["--lora", "--full", *out], "not allowed with argument")
    _one_line_error(capsys, ["--plugin-options", "{nope", *out], "not valid JSON")
    _one_line_error(capsys, ["--plugin-options", '{"packing": {}}', "--arms", "baseline", *out], "no arm uses")
    _one_line_error(capsys, ["--load", "x=no_such_module_xyz", *out], "cannot import")
    _one_line_error(capsys, ["--arms", "baseline+fused_ce", *out], "combination")
    assert not (tmp_path / "out").exists()  # nothing was started


def test_conflicting_arm_fails_before_training(tmp_path, capsys):
    """Two plugins that both supply the collator: the preflight child reports compose's PluginError."""
    out = tmp_path / "out"
    argv = [*SMALL, "--load", "a=ablate_plugins:CollatorA", "--load", "b=ablate_plugins:CollatorB",
            "--arms", "a,a+b", "--output-dir", str(out)]
    _one_line_error(capsys, argv, "arm 'a+b' cannot run")
    assert not (out / "results.json").exists() and not (out / "arms" / "baseline").exists()


def test_cli_entry_point_one_line():
    proc = subprocess.run([sys.executable, "-m", "sft_plugins.cli", "ablate", "--arms", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown plugin 'nope'" in proc.stderr


def test_yaml_config(tmp_path):
    cfg = tmp_path / "ablate.yaml"
    cfg.write_text(textwrap.dedent("""
        model: tiny
        arms: [fused_ce, padding_free+fused_ce]
        steps: 12
        batch-size: 2
        max_length: 64
        lr: 5e-4
        full: false
        lora_r: 8
        trainer: hf
        plugin_options: {fused_ce: {chunk_size: 1024}}
        load: {lr_boost: "ablate_plugins:LrBoost"}
        output_dir: somewhere
    """))
    config = parse_args(["--config", str(cfg), "--steps", "20"])  # the command line wins over the file
    assert config.arms == ["fused_ce", "padding_free+fused_ce"]
    assert (config.steps, config.batch_size, config.max_length, config.lr) == (20, 2, 64, 5e-4)
    assert config.lora and config.lora_r == 8 and config.trainer == "hf"
    assert config.plugin_options == {"fused_ce": {"chunk_size": 1024}}
    assert config.load == {"lr_boost": "ablate_plugins:LrBoost"} and config.output_dir == "somewhere"
    assert parse_args([]).arms is None and parse_args([]).resolved_lr() == 1e-3

    cfg.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        parse_args(["--config", str(cfg)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "none.yaml")])


def _arm(name, plugins, losses, status="ok", describe=None):
    return {"name": name, "plugins": plugins, "status": status, "describe": describe or {},
            "steps": [{"step": i + 1, "loss": x, "tokens": 10, "time_s": 0.1, "peak_memory_bytes": 1}
                      for i, x in enumerate(losses)]}


def test_parity_rules_for_combinations_and_bf16():
    infos = {"a": {"loss_parity": 1e-5}, "b": {"loss_parity": 1e-3}, "c": {"loss_parity": None}}
    base = _arm("baseline", [], [2.0, 1.0])
    near = [2.0, 1.0005]  # 5e-4 relative
    assert parity(_arm("a", ["a"], near), base, infos, bf16=False)["verdict"] == "fail"
    assert parity(_arm("a+b", ["a", "b"], near), base, infos, bf16=False)["verdict"] == "pass"  # loosest member
    none = parity(_arm("a+c", ["a", "c"], near), base, infos, bf16=False)
    assert none["verdict"] is None and none["max_rel_diff"] == pytest.approx(5e-4) and "c makes no" in none["note"]
    bf16 = parity(_arm("a", ["a"], [2.0, 1.01]), base, infos, bf16=True)
    assert bf16["tolerance"] == BF16_PARITY_FLOOR and bf16["verdict"] == "pass"
    # the child's describe (which sees the plugin's options) wins over discovery's
    described = _arm("a", ["a"], near, describe={"a": {"loss_parity": 1e-3}})
    assert parity(described, base, infos, bf16=False)["verdict"] == "pass"
    assert parity(_arm("a", ["a"], near), _arm("baseline", [], [], status="failed"), infos, False)["verdict"] is None
    s = summarize(_arm("x", [], [3.0, 2.0, 1.0]), skip_steps=1)
    assert s["tokens_per_s"] == pytest.approx(100.0) and s["final_loss"] == 1.0 and s["timed_steps"] == 2


def test_arm_planning():
    from sft_plugins._discovery import PluginInfo
    from sft_plugins.ablate import make_config
    from sft_plugins.ablate._runner import load_locals, plan_arms, plugin_infos

    load = {"lr_boost": "ablate_plugins:LrBoost"}
    local = load_locals(make_config(load=load))
    infos = plugin_infos(local)
    builtins = [n for n, i in infos.items() if i.source == "builtin"]
    names = lambda **kw: [a.name for a in plan_arms(make_config(load=load, **kw), infos, local)]  # noqa: E731
    assert names() == ["baseline", *builtins]  # the default: built-ins only
    assert names(all_singles=True) == ["baseline", *infos] and "lr_boost" in infos
    assert names(all=True)[-1] == "+".join(n for n, i in infos.items() if i.ok)
    assert names(arms=["lr_boost", "baseline", "fused_ce+lr_boost"]) == ["baseline", "lr_boost", "fused_ce+lr_boost"]
    broken = {**infos, "fused_ce": PluginInfo("fused_ce", "builtin", None, None, "x", error="ImportError: boom")}
    arms = {a.name: a for a in plan_arms(make_config(), broken, {})}
    assert "boom" in arms["fused_ce"].skipped and arms["baseline"].skipped is None


def test_timeout_is_reported(tmp_path):
    """An arm over its time limit is killed (its process group) and reported; the run still ends."""
    out = tmp_path / "run"
    assert main(["--timeout", "3", "--arms", "baseline", "--output-dir", str(out)]) == 1
    arms = _arms(_results(out))
    assert list(arms) == ["baseline"] and arms["baseline"]["status"] == "timeout"
    assert "killed after the 3 s timeout" in arms["baseline"]["error"]


def test_baseline_drift_marks_the_speed_ratios_inside_it(tmp_path):
    """The baseline's second run moved 10%: a 1.05x arm is inside that drift (marked, hatched in the
    throughput plot), a 1.5x arm is not; memory ratios are not affected."""
    from sft_plugins.ablate._plots import write_plots
    from sft_plugins.ablate._report import finalize, markdown

    def timed(name, plugins, step_s):
        arm = _arm(name, plugins, [2.0, 1.5, 1.0])
        for step in arm["steps"]:
            step["time_s"] = step_s
        return arm

    arms = [timed("baseline", [], 0.1), timed("a", ["a"], 0.1 / 1.05), timed("b", ["b"], 0.1 / 1.5)]
    infos = {"a": {"loss_parity": None}, "b": {"loss_parity": None}}
    config = {"model": "tiny", "lora": False, "lora_r": 16, "trainer": "sft", "steps": 3, "batch_size": 1,
              "max_length": 8, "lr": 1e-3, "seed": 0, "device": "cpu"}
    results = finalize(config, arms, infos, 1, 1.0, baseline_again=timed("baseline", [], 0.1 / 1.1))
    again = results["baseline_again"]
    assert again["drift"] == pytest.approx(0.1) and again["max_rel_loss_diff"] == 0
    summaries = {a["name"]: a["summary"] for a in results["arms"]}
    assert summaries["a"]["within_drift"] is True and summaries["b"]["within_drift"] is False
    assert "within_drift" not in summaries["baseline"]
    report = markdown(results, write_plots(results, tmp_path))
    assert "| 1.05×† |" in report and "| 1.50× |" in report and "+10.0%" in report and "same losses" in report
    # no second run: no drift, no marks
    plain = finalize(config, [timed("baseline", [], 0.1), timed("a", ["a"], 0.1 / 1.05)], infos, 1, 1.0)
    assert plain["baseline_again"] is None and "within_drift" not in plain["arms"][1]["summary"]


def test_baseline_repeats_by_default_on_a_gpu_only():
    from sft_plugins.ablate import make_config

    assert make_config().resolved_repeat_baseline(cuda=True) is True
    assert make_config().resolved_repeat_baseline(cuda=False) is False
    assert make_config(device="cpu").resolved_repeat_baseline(cuda=True) is False
    assert make_config(repeat_baseline=False).resolved_repeat_baseline(cuda=True) is False
    assert parse_args(["--repeat-baseline"]).repeat_baseline is True
