"""Per-arm summaries, the parity verdict, and the three text outputs: terminal table, report.md,
results.json. Pure functions of the child results (no torch), so they are cheap to test.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

from ..embedded import LONG_TAIL
from ._config import BASELINE, BF16_PARITY_FLOOR

RESULTS_VERSION = 1
NOISY = 0.25


# -- numbers --------------------------------------------------------------------------------------

def summarize(arm: Mapping[str, Any], skip_steps: int) -> dict[str, Any]:
    """tokens/s over the steps after the first ``skip_steps`` (warm-up: allocator, kernel autotuning,
    lazily built optimizer state), peak memory, final loss."""
    steps = [s for s in arm.get("steps", []) if s.get("loss") is not None]
    timed = steps[skip_steps:] if len(steps) > skip_steps else steps
    seconds = sum(s["time_s"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    peaks = [s["peak_memory_bytes"] for s in steps if s.get("peak_memory_bytes")]
    rates = sorted(s["tokens"] / s["time_s"] for s in timed if s["time_s"] > 0 and s["tokens"])
    median = rates[len(rates) // 2] if rates else None
    mean = tokens / seconds if seconds > 0 and tokens else None
    cpu = sum(s.get("cpu_s") or 0.0 for s in timed)
    return {
        "steps_done": len(steps),
        "timed_steps": len(timed),
        "final_loss": steps[-1]["loss"] if steps else None,
        "tokens_per_s": mean,
        # robust to bursts of load from other processes on a shared machine; when the two disagree by
        # more than NOISY, the table flags the arm's timing as noisy
        "tokens_per_s_median": median,
        "tokens_per_cpu_s": tokens / cpu if cpu > 0 and tokens else None,
        "timing_noisy": bool(mean and median and abs(mean / median - 1) > NOISY),
        "step_s": seconds / len(timed) if timed else None,
        "tokens_per_step": tokens / len(timed) if timed else None,
        "peak_memory_bytes": max(peaks) if peaks else None,
    }


def tolerance_of(arm: Mapping[str, Any], infos: Mapping[str, Mapping[str, Any]]) -> tuple[float | None, str]:
    """The loss-parity tolerance an arm promises: its plugin's, for a combination the loosest of its
    members', and none when any member makes no promise. The child's ``sft_describe`` (which sees
    the plugin options) wins over the one read at discovery."""
    described = arm.get("describe") or {}
    tols = []
    for name in arm.get("plugins", []):
        desc = described.get(name) or {}
        tol = desc["loss_parity"] if "loss_parity" in desc else (infos.get(name) or {}).get("loss_parity")
        if tol is None:
            return None, f"{name} makes no loss-parity promise"
        tols.append(float(tol))
    if not tols:
        return None, "reference"
    return max(tols), ""


def rel_loss_diffs(arm: Mapping[str, Any], base: Mapping[str, Any]) -> list[float]:
    """|loss - baseline loss| / |baseline loss| at every step both logged."""
    ref = {s["step"]: s["loss"] for s in base.get("steps", []) if s.get("loss") is not None}
    return [abs(s["loss"] - ref[s["step"]]) / max(abs(ref[s["step"]]), 1e-12)
            for s in arm.get("steps", []) if s.get("loss") is not None and s["step"] in ref]


def parity(arm: Mapping[str, Any], base: Mapping[str, Any] | None, infos: Mapping[str, Mapping[str, Any]],
           bf16: bool) -> dict[str, Any]:
    """Max relative per-step loss difference to the baseline, and the verdict against the promise."""
    promised, why = tolerance_of(arm, infos)
    out: dict[str, Any] = {"promised": promised, "tolerance": None, "max_rel_diff": None, "verdict": None,
                           "steps_compared": 0, "note": why}
    if not arm.get("plugins"):
        return out
    if base is None or base.get("status") != "ok":
        out["note"] = "no baseline to compare with"
        return out
    diffs = rel_loss_diffs(arm, base)
    if diffs:
        out["max_rel_diff"] = max(diffs)
        out["steps_compared"] = len(diffs)
    if promised is None:
        return out
    if arm.get("status") != "ok" or not diffs:
        out["note"] = "the arm did not finish" if arm.get("status") != "ok" else "no steps to compare"
        return out
    tol = max(promised, BF16_PARITY_FLOOR) if bf16 else promised
    out["tolerance"] = tol
    if bf16 and tol > promised:
        out["note"] = f"bf16 run: tolerance raised from {promised:g} to the {BF16_PARITY_FLOOR:g} floor"
    finite = all(math.isfinite(d) for d in diffs)
    out["verdict"] = "pass" if finite and out["max_rel_diff"] <= tol else "fail"
    return out


def drift(base: Mapping[str, Any], again: Mapping[str, Any], skip_steps: int) -> dict[str, Any]:
    """The baseline run a second time, after the last arm: how far the machine's speed moved over the ablation
    (``drift``: relative change in tokens/s), and whether the same run gave the same losses."""
    s = summarize(again, skip_steps)
    first = (base.get("summary") or {}).get("tokens_per_s")
    diffs = rel_loss_diffs(again, base)
    return {"status": again.get("status"), "error": again.get("error"), "summary": s, "steps": again.get("steps", []),
            "drift": s["tokens_per_s"] / first - 1 if s["tokens_per_s"] and first else None,
            "max_rel_loss_diff": max(diffs) if diffs else None}


def finalize(config: Mapping[str, Any], arms: list[dict[str, Any]], infos: Mapping[str, Mapping[str, Any]],
             skip_steps: int, wall_s: float, baseline_again: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The content of results.json: every arm with its steps, summary, ratios and parity; with
    ``baseline_again`` (the baseline's second run), the drift, and which speed ratios lie within it."""
    base = next((a for a in arms if a["name"] == BASELINE), None)
    env_arm = next((a for a in arms if a.get("device")), {})
    bf16 = bool(env_arm.get("bf16"))
    for arm in arms:
        arm["summary"] = summarize(arm, skip_steps)
        arm["parity"] = parity(arm, base, infos, bf16)
    bsum = (base or {}).get("summary") or {}
    for arm in arms:
        s = arm["summary"]
        s["speedup"] = _ratio(s["tokens_per_s"], bsum.get("tokens_per_s"))
        s["memory_ratio"] = _ratio(s["peak_memory_bytes"], bsum.get("peak_memory_bytes"))
    again = drift(base, baseline_again, skip_steps) if base and baseline_again else None
    if again and again["drift"] is not None:
        for arm in arms:
            s = arm["summary"]
            if arm is not base and s["speedup"] is not None:
                s["within_drift"] = abs(s["speedup"] - 1) <= abs(again["drift"])
    return {
        "version": RESULTS_VERSION,
        "config": dict(config),
        "environment": {k: env_arm.get(k) for k in ("device", "device_name", "dtype", "bf16", "memory_kind",
                                                     "versions", "model_parameters")},
        "skip_steps": skip_steps,
        "wall_s": wall_s,
        "plugins": {k: dict(v) for k, v in infos.items()},
        "arms": arms,
        "baseline_again": again,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# -- formatting -----------------------------------------------------------------------------------

def fmt_bytes(n: float | None) -> str:
    if not n:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:,.2f} {unit}" if unit == "GiB" else f"{n / size:,.0f} {unit}"
    return f"{n / 1024:,.0f} KiB"


def fmt_num(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def fmt_parity(p: Mapping[str, Any]) -> str:
    """Short: "✓ 3.1e-06 ≤ 1e-05", "✗ 4.2e-02 > 1e-03", "— Δ 6.8e-04" (no promise), "ref"."""
    diff = p.get("max_rel_diff")
    d = "-" if diff is None else f"{diff:.1e}"
    if p.get("verdict") == "pass":
        return f"✓ {d} ≤ {p['tolerance']:.0e}"
    if p.get("verdict") == "fail":
        return f"✗ {d} > {p['tolerance']:.0e}"
    if p.get("note") == "reference":
        return "ref"
    return f"— Δ {d}" if diff is not None else "—"


def rows(results: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row of display strings per arm, shared by the terminal table and report.md."""
    out = []
    for arm in results["arms"]:
        s, p = arm.get("summary", {}), arm.get("parity", {})
        status = arm["status"]
        out.append({
            "arm": arm["name"],
            "status": status if status in ("ok", "skipped") else f"{status.upper()} ({s.get('steps_done', 0)} steps)",
            "tok/step": fmt_num(s.get("tokens_per_step")),
            "final loss": fmt_num(s.get("final_loss"), ".4f"),
            "loss parity": fmt_parity(p) if status == "ok" else "-",
            "tok/s": fmt_num(s.get("tokens_per_s")) + ("*" if s.get("timing_noisy") else ""),
            "speed": "-" if s.get("speedup") is None
            else f"{s['speedup']:.2f}×" + ("†" if s.get("within_drift") else ""),
            "ms/step": "-" if s.get("step_s") is None else f"{s['step_s'] * 1000:,.0f}",
            "peak mem": fmt_bytes(s.get("peak_memory_bytes")),
            "mem": "-" if s.get("memory_ratio") is None else f"{s['memory_ratio']:.2f}×",
        })
    return out


def one_line(text: str | None, limit: int = 160) -> str:
    line = " ".join((text or "").split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def terminal_table(results: Mapping[str, Any]) -> Any:
    from rich.table import Table

    env = results["environment"]
    where = env.get("device_name") or env.get("device") or results["config"]["device"]
    dtype = f" ({env['dtype']})" if env.get("dtype") else ""
    title = f"sft-plugins ablate: {results['config']['model']} on {where}{dtype}, {results['config']['steps']} steps"
    table = Table(title=title, caption=f"tok/s: loss-target tokens/s over steps {results['skip_steps'] + 1}+; "
                                       f"speed, mem: ratio to baseline; peak mem: {env.get('memory_kind') or '-'}; "
                                       f"loss parity: max relative loss diff vs the plugin's tolerance"
                                       + _noisy_note(results)
                                       + (f"\nbaseline again: {_drift_note(results)}" if results.get("baseline_again")
                                          else ""))
    data = rows(results)
    for col in (data[0].keys() if data else ["arm"]):
        table.add_column(col, justify="left" if col in ("arm", "status", "loss parity") else "right",
                         no_wrap=col != "arm")
    for arm, row in zip(results["arms"], data):
        style = {"ok": None, "skipped": "dim"}.get(arm["status"], "red")
        parity_style = {"pass": "green", "fail": "bold red"}.get(arm.get("parity", {}).get("verdict") or "", "")
        cells = [f"[{parity_style}]{v}[/]" if k == "loss parity" and parity_style else v for k, v in row.items()]
        table.add_row(*cells, style=style)
    return table


def _noisy_note(results: Mapping[str, Any]) -> str:
    noisy = [a for a in results["arms"] if (a.get("summary") or {}).get("timing_noisy")]
    if not noisy:
        return ""
    medians = ", ".join(f"{a['name']} {a['summary']['tokens_per_s_median']:,.0f}" for a in noisy)
    return (f"\n* step times varied: mean tok/s is {NOISY:.0%}+ off the median step's ({medians}): "
            "was the machine busy?")


def _drift_note(results: Mapping[str, Any]) -> str:
    again = results["baseline_again"]
    if again["drift"] is None:
        return f"the baseline's second run, after the last arm, did not finish ({again['status']}): no drift measured."
    base = next(a for a in results["arms"] if a["name"] == BASELINE)
    d, loss = again["drift"], again["max_rel_loss_diff"]
    same = ("the same losses" if loss == 0 else
            f"losses within {loss:.1e} relative" if loss is not None else "no losses to compare")
    return (f"run once more after the last arm, the baseline made {again['summary']['tokens_per_s']:,.0f} tok/s "
            f"against {base['summary']['tokens_per_s']:,.0f} in its first run ({d:+.1%}; {same}). The machine's "
            f"speed drifted that much over the ablation: a speed ratio within ±{abs(d):.1%} of 1.00× "
            "(marked †) is not told apart from the baseline by this run.")


def _dataset_words(cfg: Mapping[str, Any]) -> str:
    if cfg.get("dataset") == LONG_TAIL:
        return (f"`{LONG_TAIL}` (generated token rows, lognormal lengths, median ~330, up to {cfg['max_length']} "
                "tokens, full-sequence loss)")
    return f"`{cfg.get('dataset') or 'generated (sft_plugins.embedded)'}`"


def _batch_words(cfg: Mapping[str, Any]) -> str:
    accumulation = cfg.get("grad_accum") or 1
    return f"{cfg['batch_size']}" + (f" × grad-accum {accumulation}" if accumulation > 1 else "")


def markdown(results: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    cfg, env = results["config"], results["environment"]
    data = rows(results)
    lines = [
        "# sft-plugins ablation",
        "",
        f"Model `{cfg['model']}` ({'LoRA r=%d' % cfg['lora_r'] if cfg['lora'] else 'full fine-tuning'}), "
        f"dataset {_dataset_words(cfg)}, trainer `{cfg['trainer']}`, "
        f"{cfg['steps']} steps × batch {_batch_words(cfg)}, max length {cfg['max_length']}, "
        f"lr {cfg['lr']:g}, seed {cfg['seed']}.",
        f"Device: {env.get('device_name') or env.get('device')} ({env.get('dtype')}); "
        + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items()) + ".",
        f"Total wall time {results['wall_s']:.0f} s; every arm ran in a fresh process.",
        "",
    ]
    if results.get("incomplete"):
        missing = [a["name"] for a in results["arms"] if a["status"] not in ("ok", "skipped")]
        lines += [f"**Incomplete**: {', '.join(missing)} did not finish (see below); the other arms are complete "
                  "and comparable.", ""]
    if cfg.get("trl_config"):
        # every key the user's `trl sft` config sets, as set; the arms changed only max_steps, checkpoints,
        # logging, output_dir and run_name
        lines += [f"Workload from `{cfg['trl_config']}` (each arm: `max_steps={cfg['steps']}`, no checkpoints, a log "
                  "every step, its own `output_dir` and `run_name`):", "", "| key | value |", "|---|---|"]
        lines += [f"| `{k}` | `{json.dumps(v, default=str)}` |" for k, v in (cfg.get("trl_values") or {}).items()]
        lines += [""]
        if cfg.get("trl_flags"):
            lines += [f"Overridden by the flags `{' '.join(cfg['trl_flags'])}`.", ""]
    if data:
        keys = list(data[0].keys())
        lines += ["| " + " | ".join(keys) + " |",
                  "|" + "|".join("---" if k in ("arm", "status", "loss parity") else "---:" for k in keys) + "|"]
        lines += ["| " + " | ".join(r[k].replace("|", "\\|") for k in keys) + " |" for r in data]
    lines += [
        "",
        f"- **tokens/s**: loss-target tokens (labels ≠ -100 after the causal shift; pad and packing filler never "
        f"count) per second of wall time, over steps {results['skip_steps'] + 1}–{cfg['steps']} (the first "
        f"{results['skip_steps']} are warm-up). **speed**, **mem**: ratio to the baseline arm."
        + _noisy_note(results).replace("\n", " "),
        *([f"- **baseline again**: {_drift_note(results)}"] if results.get("baseline_again") else []),
        f"- **peak mem**: {env.get('memory_kind') or '-'} (on CPU this is the whole process, imports included).",
        "- **loss parity**: ✓/✗ max over steps of |loss − baseline loss| / baseline loss, against the tolerance the "
        "plugin promises (a combination: the loosest member's; none if any member makes no promise; "
        f"bf16 runs: at least {BF16_PARITY_FLOOR:g}); — Δ: the plugin makes no promise, the difference is shown.",
        "",
    ]
    cpu_rates = [(a["name"], (a.get("summary") or {}).get("tokens_per_cpu_s")) for a in results["arms"]]
    if env.get("device") == "cpu" and any(r for _, r in cpu_rates):
        lines += ["Tokens per CPU-second (process CPU time, all threads: less sensitive than wall time to other "
                  "load on a shared machine): " + ", ".join(f"{n} {r:,.0f}" for n, r in cpu_rates if r) + ".", ""]
    for kind, path in plots.items():
        lines += [f"![{kind}]({pathlib.Path(path).name})", ""]
    problems = [a for a in results["arms"] if a["status"] != "ok"]
    if problems:
        lines += ["## Arms that did not finish", ""]
        for arm in problems:
            lines += [f"### {arm['name']}: {arm['status']}", "", one_line(arm.get("error"), 1000), ""]
            tail = (arm.get("error_tail") or "").strip()
            if tail:
                lines += ["```", *tail.splitlines()[-15:], "```", ""]
    notes = [(a["name"], a["parity"]["note"]) for a in results["arms"]
             if a.get("parity", {}).get("note") and a["parity"]["note"] != "reference"
             and "makes no loss-parity promise" not in a["parity"]["note"]]
    if notes:
        lines += ["## Notes", ""] + [f"- {name}: {note}" for name, note in notes] + [""]
    return "\n".join(lines)


def write_json(results: Mapping[str, Any], path: pathlib.Path) -> None:
    path.write_text(json.dumps(results, indent=1, default=str))
