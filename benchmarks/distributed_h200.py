"""DDP and FSDP2 on a 2-GPU machine: every arm of ``tests/distributed/train_arms.py`` with GPU defaults.

One command (both GPUs, NCCL; ~3-5 min on 2x H200):

    torchrun --standalone --nproc_per_node 2 benchmarks/distributed_h200.py \\
        --out benchmarks/results/distributed_h200.json

and a CPU check of the script itself (2 gloo processes, tiny model, fp32, a few steps):

    torchrun --standalone --nproc_per_node 2 benchmarks/distributed_h200.py --smoke --out /tmp/dist_smoke.json

Two passes, each one launch of arms in one process pair (an arm = a fresh model from the same seed,
TRL's unmodified ``SFTTrainer``, the stack composed, ``undo()`` after):

1. ``parity``: the tiny preset in fp32 (exactness; bf16 would hide a wrong gradient reduction) —
   DDP and FSDP2 for baseline / fused_ce / fused_ce+padding_free, FSDP2 with the lm_head a unit of its
   own (``fsdp2_head_unit``: TRL's head and fused_ce), FSDP2 activation checkpointing (``fsdp2_ac``).
2. ``perf``: ``llama-3.2-1b-shape`` (tied head, 128k vocab) in bf16, batch 4 x up to 2048 tokens —
   DDP: baseline, fused_ce, fused_ce+padding_free, smart_checkpointing (offload per rank),
   fused_ce+padding_free+smart_checkpointing, packing; FSDP2: baseline, fused_ce,
   fused_ce+padding_free; FSDP2 + FSDP activation checkpointing: baseline, fused_ce+padding_free.

``--out`` gets ``{"parity": <train_arms JSON>, "perf": <train_arms JSON>, "summary": [...]}``: per arm
and rank the loss per step (the trainer's, averaged over ranks, and the rank's own), tokens/s (all
ranks, steps after the first), per-step times, peak CUDA memory per rank, the weights' checksum, and
what the fused_ce kernel was given as lm_head weight; the summary adds each arm's largest relative loss
difference to the DDP arm of the same plugins. A markdown table goes to stdout (rank 0).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "train_arms.py"

PARITY_ARMS = ["ddp:baseline", "ddp:fused_ce", "ddp:fused_ce+padding_free",
               "fsdp2:baseline", "fsdp2:fused_ce", "fsdp2:fused_ce+padding_free",
               "fsdp2_head_unit:baseline", "fsdp2_head_unit:fused_ce", "fsdp2_ac:fused_ce"]
PERF_ARMS = ["ddp:baseline", "ddp:fused_ce", "ddp:fused_ce+padding_free", "ddp:smart_checkpointing",
             "ddp:fused_ce+padding_free+smart_checkpointing", "ddp:packing",
             "fsdp2:baseline", "fsdp2:fused_ce", "fsdp2:fused_ce+padding_free",
             "fsdp2_ac:baseline", "fsdp2_ac:fused_ce+padding_free"]


def _train_arms() -> Any:
    spec = importlib.util.spec_from_file_location("train_arms", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _run(module: Any, argv: list[str]) -> None:
    saved = sys.argv
    sys.argv = [str(SCRIPT), *argv]
    try:
        module.main()
    finally:
        sys.argv = saved


def _summary(name: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    runs = data["runs"]
    by = {(r["mode"], r["arm"], r["rank"]): r for r in runs}
    rows = []
    for r in runs:
        if r["rank"] != 0:
            continue
        ranks = [q for q in runs if q["mode"] == r["mode"] and q["arm"] == r["arm"]]
        row: dict[str, Any] = {"pass": name, "mode": r["mode"], "arm": r["arm"], "error": r["error"]}
        if r["error"] is None:
            ddp = by.get(("ddp", r["arm"], 0))
            diff = None
            if ddp is not None and ddp["error"] is None and r["mode"] != "ddp":
                diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["losses"], ddp["losses"]))
            row.update(
                final_loss=r["losses"][-1], max_rel_loss_diff_vs_ddp=diff,
                param_sum_vs_ddp=(None if ddp is None or ddp["error"] else r["param_sum"] / ddp["param_sum"] - 1),
                tokens_per_s=r["tokens_per_s"],
                peak_mem_gb_per_rank=[q["peak_mem_gb"] for q in sorted(ranks, key=lambda q: q["rank"])],
                ranks_agree=len({q["param_sum"] for q in ranks}) == 1 and len({tuple(q["losses"]) for q in ranks}) == 1,
                head_at_kernel=r["kernel_weights"])
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    out = ["| pass | mode | arm | final loss | max rel diff vs DDP | params vs DDP | tok/s (2 ranks) | "
           "peak GiB r0 / r1 | ranks agree |", "|---|---|---|---|---|---|---|---|---|"]
    f = (lambda v, fmt: "-" if v is None else format(v, fmt))
    for r in rows:
        if r["error"]:
            out.append(f"| {r['pass']} | {r['mode']} | {r['arm']} | error: {r['error'][:80]} | | | | | |")
            continue
        mem = " / ".join(f(m, ".2f") for m in r["peak_mem_gb_per_rank"])
        out.append(f"| {r['pass']} | {r['mode']} | {r['arm']} | {r['final_loss']:.5f} | "
                   f"{f(r['max_rel_loss_diff_vs_ddp'], '.1e')} | {f(r['param_sum_vs_ddp'], '.1e')} | "
                   f"{f(r['tokens_per_s'], ',.0f')} | {mem} | {r['ranks_agree']} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="CPU/gloo, tiny model, fp32, 3 steps (checks the script)")
    p.add_argument("--perf-model", default="llama-3.2-1b-shape")
    p.add_argument("--perf-steps", type=int, default=20)
    p.add_argument("--perf-batch", type=int, default=4)
    p.add_argument("--perf-max-length", type=int, default=2048)
    opts = p.parse_args()
    module = _train_arms()
    rank = int(os.environ.get("RANK", "0"))
    # one shared scratch path per launch (rank 0's pid is not known to rank 1)
    tmp = Path(tempfile.gettempdir()) / f"distributed_h200_{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    tmp.mkdir(parents=True, exist_ok=True)
    common = ["--cpu", "--steps", "3"] if opts.smoke else []
    passes = {
        "parity": ["--model", "tiny", "--steps", "6", "--batch", "4", "--max-length", "256", "--dataset-size", "64",
                   "--arms", ",".join(PARITY_ARMS)],
        "perf": ["--model", "tiny" if opts.smoke else opts.perf_model, "--steps", str(opts.perf_steps),
                 "--batch", str(opts.perf_batch), "--max-length", str(opts.perf_max_length), "--max-words", "600",
                 "--dataset-size", str(max(64, 2 * opts.perf_steps * opts.perf_batch + 16)),
                 "--lr", "2e-5", *([] if opts.smoke else ["--bf16"]), "--arms", ",".join(PERF_ARMS)],
    }
    result: dict[str, Any] = {}
    for name, argv in passes.items():
        out = tmp / f"{name}.json"
        _run(module, [*argv, *common, "--out", str(out)])
        if rank == 0:
            result[name] = json.loads(out.read_text())
    if rank == 0:
        result["summary"] = [row for name in passes for row in _summary(name, result[name])]
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(result, indent=1))
        print(_table(result["summary"]))
        print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    main()
