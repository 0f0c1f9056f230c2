"""Real tokens/s against peak GPU memory, from ``end_to_end.py`` results: one curve per workload (its arms
sorted by peak memory), peers as single points. It draws what the runs measured; it runs nothing.

    python benchmarks/memory_curve.py --out docs/memory_budget_h100.png \\
        --curve "bf16 1B LoRA=benchmarks/results/end_to_end_h100_bf16_1b_budget_profile.json" \\
        --curve "QLoRA 8B=benchmarks/results/end_to_end_h100_qlora_8b.json,benchmarks/results/end_to_end_h100_qlora_8b_budget_profile.json"

Each ``--curve LABEL=FILE[,FILE...]`` takes the ok arms of its files (a later file wins for an arm it also
has); arms whose name starts with ``ours`` make the curves (one with ``fused_lora``, one without), the
others (peers) are drawn as points. The markdown table of the points is printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def points(files: list[str]) -> dict[str, dict[str, Any]]:
    arms: dict[str, dict[str, Any]] = {}
    for f in files:
        for name, r in json.loads(Path(f).read_text())["arms"].items():
            if r.get("status") == "ok" and r.get("peak_GiB") is not None:
                arms[name] = {"tokens_per_s": r["tokens_per_s"], "peak_GiB": r["peak_GiB"], "file": Path(f).name}
    return arms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--curve", action="append", required=True, help="LABEL=FILE[,FILE...]")
    ap.add_argument("--out", required=True, help="PNG to write")
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(c.split("=", 1)[0], points(c.split("=", 1)[1].split(","))) for c in a.curve]
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), squeeze=False)
    print("| workload | arm | peak GiB | real tok/s | file |\n|---|---|---|---|---|")
    for ax, (label, arms) in zip(axes[0], curves):
        ours = sorted(((n, r) for n, r in arms.items() if n.startswith("ours")), key=lambda nr: nr[1]["peak_GiB"])
        peers = [(n, r) for n, r in arms.items() if not n.startswith("ours")]
        for series in ("ours", "ours + fused_lora"):
            line = [r for n, r in ours if ("fused_lora" in n) == series.endswith("fused_lora")]
            ax.plot([r["peak_GiB"] for r in line], [r["tokens_per_s"] for r in line], "o-", label=series)
        for n, r in ours + peers:
            ax.annotate(n.removeprefix("ours_"), (r["peak_GiB"], r["tokens_per_s"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
            print(f"| {label} | {n} | {r['peak_GiB']} | {r['tokens_per_s']:,.0f} | {r['file']} |")
        if peers:
            ax.plot([r["peak_GiB"] for _, r in peers], [r["tokens_per_s"] for _, r in peers], "s", color="grey",
                    label="peers")
        ax.set_xscale("log")
        ax.set_xlabel("peak GPU memory, GiB (log)")
        ax.set_ylabel("real tokens/s")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
