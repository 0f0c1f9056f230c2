"""PNG plots of an ablation: loss curves (and their distance to the baseline), tokens/s, peak memory.

Made to be read at a glance: the baseline is a grey reference everywhere, bars carry their value and
ratio to the baseline, failed arms are named on the chart instead of silently missing.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

from ._config import BASELINE

BASE_COLOR = "#7f7f7f"
FASTER, SLOWER, SAME = "#2ca02c", "#d62728", "#9ecae1"
NOISY_COLOR = "#d9d9d9"
SAME_BAND = 0.03  # within ±3% of the baseline is run-to-run noise on a shared machine: not coloured as a win/loss
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _palette(n: int) -> list[Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    colors = [c for i, c in enumerate(cmap.colors) if i != 7]  # tab10's grey is the baseline's colour
    return [colors[i % len(colors)] for i in range(n)]


def loss_plot(results: Mapping[str, Any], path: pathlib.Path) -> None:
    """Top: training loss per step, all arms overlaid. Bottom: relative difference to the baseline on
    a log axis, with each arm's parity tolerance dashed: identical curves on top still separate here."""
    plt = _plt()
    arms = [a for a in results["arms"] if any(s.get("loss") is not None for s in a.get("steps", []))]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    others = [a for a in arms if a["name"] != BASELINE]
    colors = dict(zip((a["name"] for a in others), _palette(len(others))))
    base = next((a for a in arms if a["name"] == BASELINE), None)
    ref = {s["step"]: s["loss"] for s in (base or {}).get("steps", []) if s.get("loss") is not None}
    if base is not None:
        xs, ys = zip(*sorted(ref.items()))
        top.plot(xs, ys, color=BASE_COLOR, lw=5, alpha=0.45, label=BASELINE, zorder=1)
    for i, arm in enumerate(others):
        pts = [(s["step"], s["loss"]) for s in arm["steps"] if s.get("loss") is not None]
        xs, ys = zip(*pts)
        label = arm["name"] + ("" if arm["status"] == "ok" else f" ({arm['status']})")
        style = dict(color=colors[arm["name"]], ls=LINESTYLES[i % len(LINESTYLES)], lw=1.6,
                     marker=MARKERS[i % len(MARKERS)], markevery=max(1, len(xs) // 8), ms=5)
        top.plot(xs, ys, label=label, zorder=2, **style)
        diffs = [(x, abs(y - ref[x]) / max(abs(ref[x]), 1e-12)) for x, y in pts if x in ref]
        if diffs:
            dx, dy = zip(*diffs)
            bottom.plot(dx, [max(d, 1e-9) for d in dy], **style)
            tol = (arm.get("parity") or {}).get("tolerance")
            if tol:  # only plugins that promise parity have one: the others are drawn without a line
                bottom.axhline(tol, color=colors[arm["name"]], ls=(0, (4, 4)), lw=1, alpha=0.8,
                               label=f"{arm['name']}: tolerance {tol:g}")
    top.set_ylabel("training loss")
    top.set_title("Loss per step (same seed, data order and hyperparameters)")
    top.grid(alpha=0.3)
    if arms:
        top.legend(loc="upper right", fontsize=9, framealpha=0.9)
    else:
        top.text(0.5, 0.5, "no arm finished a step", ha="center", va="center", transform=top.transAxes)
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(loc="upper right", fontsize=8, framealpha=0.9)
    bottom.set_yscale("log")
    bottom.set_ylabel("|loss − baseline| / baseline")
    bottom.set_xlabel("optimizer step")
    bottom.set_title("Distance to the baseline (dashed: the plugin's parity tolerance; 1e-9 = identical)",
                     fontsize=10)
    bottom.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bar_plot(results: Mapping[str, Any], path: pathlib.Path, key: str, ratio_key: str, title: str,
              xlabel: str, fmt: Any, higher_is_better: bool, scale: float = 1.0) -> None:
    plt = _plt()
    arms = list(results["arms"])
    names = [a["name"] for a in arms]
    values = [((a.get("summary") or {}).get(key) or 0.0) / scale for a in arms]
    ratios = [(a.get("summary") or {}).get(ratio_key) for a in arms]
    # timing too noisy within the arm; or (speed only) a ratio within the baseline's drift between its two runs
    drifted = [ratio_key == "speedup" and bool((a.get("summary") or {}).get("within_drift")) for a in arms]
    noisy = [bool((a.get("summary") or {}).get("timing_noisy")) or d for a, d in zip(arms, drifted)]
    colors = []
    for arm, r, loud in zip(arms, ratios, noisy):
        if loud:  # the report flags its step times as noisy: no win/loss colour
            colors.append(NOISY_COLOR)
        elif arm["name"] == BASELINE or r is None:
            colors.append(BASE_COLOR)
        elif abs(r - 1.0) <= SAME_BAND:
            colors.append(SAME)
        else:
            better = r > 1.0 if higher_is_better else r < 1.0
            colors.append(FASTER if better else SLOWER)
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(arms) + 1.6))
    ys = list(range(len(arms)))[::-1]  # first arm (baseline) on top
    bars = ax.barh(ys, values, color=colors, height=0.6)
    for bar, loud in zip(bars, noisy):
        if loud:
            bar.set_hatch("//")
            bar.set_edgecolor(BASE_COLOR)
    vmax = max(values) if any(values) else 1.0
    base_value = next((v for a, v in zip(arms, values) if a["name"] == BASELINE and v), None)
    if base_value:
        ax.axvline(base_value, color=BASE_COLOR, ls="--", lw=1)
    for y, arm, v, r, loud, drift in zip(ys, arms, values, ratios, noisy, drifted):
        if arm["status"] != "ok" or not v:
            ax.text(vmax * 0.01, y, f"{arm['status']}: {(arm.get('error') or '')[:70]}", va="center",
                    fontsize=9, color=SLOWER if arm["status"] != "skipped" else BASE_COLOR)
            continue
        ratio = "" if r is None or arm["name"] == BASELINE else f"  ({r:.2f}× baseline)"
        flag = ("  within the baseline's drift" if drift else "  noisy timing: busy machine?") if loud else ""
        ax.text(v + vmax * 0.01, y, fmt(v) + ratio + flag, va="center", fontsize=9)
    ax.set_yticks(ys, names)
    ax.set_xlim(0, vmax * 1.45)
    ax.set_xlabel(f"{xlabel}      (green: better, red: worse, light blue: within ±{SAME_BAND:.0%} of the "
                  "baseline, dashed; hatched grey: too noisy to compare)", fontsize=9)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(results: Mapping[str, Any], out_dir: pathlib.Path) -> dict[str, str]:
    """Write loss.png, throughput.png, memory.png; return {kind: path}."""
    env = results["environment"]
    skip = results["skip_steps"]
    paths = {k: out_dir / f"{k}.png" for k in ("loss", "throughput", "memory")}
    loss_plot(results, paths["loss"])
    _bar_plot(results, paths["throughput"], "tokens_per_s", "speedup",
              f"Throughput: loss-target tokens per second (steps {skip + 1}+; higher is better)",
              "tokens / s", lambda v: f"{v:,.0f} tok/s", higher_is_better=True)
    mem_kind = env.get("memory_kind") or "peak memory"
    _bar_plot(results, paths["memory"], "peak_memory_bytes", "memory_ratio",
              f"Peak memory: {mem_kind} (lower is better)", "MiB",
              lambda v: f"{v:,.0f} MiB", higher_is_better=False, scale=2**20)
    return {k: str(v) for k, v in paths.items()}
