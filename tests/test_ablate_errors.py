"""Nothing lost, clear errors: an interrupted ablation still reports the arms that finished; a bad output
dir or a malformed config file is one line naming the path, the place and the fix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sft_plugins.ablate import ConfigError, run_ablation
from sft_plugins.ablate._config import load_yaml


def test_interrupt_keeps_the_finished_arms(tmp_path, monkeypatch):
    from sft_plugins.ablate import AblationInterrupted, _runner

    real = _runner.run_child
    calls = []

    def run_child(spec, arm_dir, timeout, on_event=None):
        calls.append(spec["arm"])
        if len(calls) == 2:  # Ctrl-C while the second arm trains
            raise KeyboardInterrupt
        return real(spec, arm_dir, timeout, on_event)

    monkeypatch.setattr(_runner, "run_child", run_child)
    out = tmp_path / "abl"
    with pytest.raises(AblationInterrupted) as info:
        run_ablation({"arms": ["padding_free", "fused_ce"], "steps": 3, "batch_size": 2, "output_dir": str(out),
                      "preflight": False}, show_progress=False)
    results = json.loads((out / "results.json").read_text())
    assert results["incomplete"] is True and info.value.results["incomplete"] is True
    status = {a["name"]: a["status"] for a in results["arms"]}
    assert status == {"baseline": "ok", "padding_free": "interrupted", "fused_ce": "interrupted"}
    report = (out / "report.md").read_text()
    assert "**Incomplete**" in report and "padding_free, fused_ce" in report
    assert (out / "loss.png").exists()


def test_unwritable_output_dir_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    run = subprocess.run([sys.executable, "-m", "sft_plugins.cli", "ablate", "--arms", "fused_ce", "--output-dir",
                          str(blocker / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"output dir {blocker / 'out'}: cannot write there" in run.stderr


@pytest.mark.parametrize("name, text, where", [
    ("bad.json", '{\n  "steps": 3,\n  "arms": ["fused_ce",,]\n}\n', "JSON at line 3, column"),
    ("bad.yaml", "steps: 3\narms: [fused_ce\n", "YAML at line"),
])
def test_malformed_config_names_line_and_column(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=where):
        load_yaml(path)


def test_plots_mark_noisy_arms_and_draw_tolerances_only_for_promises(tmp_path):
    """The throughput/memory bars of an arm with noisy timing are hatched grey and flagged; the loss panel has a
    tolerance line (with a legend entry) only for arms whose plugins promise parity."""
    from sft_plugins.ablate import _plots

    steps = [{"step": i, "loss": 5.0 - 0.1 * i} for i in range(1, 6)]
    arm = lambda name, tol, noisy, speed: {  # noqa: E731
        "name": name, "status": "ok", "steps": steps, "parity": {"tolerance": tol},
        "summary": {"tokens_per_s": 100 * speed, "speedup": speed, "peak_memory_bytes": 2**30, "memory_ratio": 1.0,
                    "timing_noisy": noisy}}
    results = {"environment": {"memory_kind": "rss"}, "skip_steps": 1,
               "arms": [arm("baseline", None, False, 1.0), arm("fused_ce", 1e-3, False, 1.2),
                        arm("packing", None, True, 3.0)]}
    drawn = {}
    import matplotlib.axes

    orig_barh, orig_axhline = matplotlib.axes.Axes.barh, matplotlib.axes.Axes.axhline

    def barh(self, *a, **k):
        bars = orig_barh(self, *a, **k)
        drawn.setdefault("bars", []).append(bars)
        return bars

    def axhline(self, *a, **k):
        drawn.setdefault("lines", []).append(k.get("label"))
        return orig_axhline(self, *a, **k)

    matplotlib.axes.Axes.barh, matplotlib.axes.Axes.axhline = barh, axhline
    try:
        _plots.write_plots(results, tmp_path)
    finally:
        matplotlib.axes.Axes.barh, matplotlib.axes.Axes.axhline = orig_barh, orig_axhline
    assert drawn["lines"] == ["fused_ce: tolerance 0.001"]  # none for packing, which promises nothing
    for bars in drawn["bars"]:  # throughput and memory: bar 2 (packing) hatched, the others not
        assert [b.get_hatch() for b in bars] == [None, None, "//"]
