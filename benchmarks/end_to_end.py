"""End to end on one GPU, every arm in the same run: TRL 1.16, TRL + Liger, Unsloth, and our plugins.

The reference workload the peers were compared on: a random-initialised Llama-3.2-1B-shaped model
(bf16, sdpa, tied embeddings, vocab 128256), LoRA r16 alpha16 on all linear layers, batch 8, 4000
pre-tokenised examples with lognormal(5.8, 0.8) lengths clipped to [24, 2048] (mean ~442), seed 0, lr
2e-4, TRL defaults otherwise (its fused LM head, gradient checkpointing, adamw_torch_fused). Every arm runs in its own
subprocess (patches are process-global); Unsloth arms with Unsloth's own PYTHONPATH.
``--quant 4bit`` makes it the QLoRA workload: the model is saved once and every arm loads it NF4 + double
quant (bf16 compute; Unsloth: ``load_in_4bit=True``) with ``optim="adamw_8bit"`` (ours: our adamw_8bit
where composed); ``--preset llama-3-8b-shape`` (with its own ``--model-dir``) the 8B shape.

Arms (``--arms``, comma list, or ``set1`` / ``set2`` / ``all``):
  peers, 2k LoRA  trl_default, trl_padding_free (max_length=None), trl_packing_bfd, trl_liger_packing
                  (use_liger_kernel + BFD packing), unsloth_default, unsloth_packing (Unsloth's defaults:
                  its offloaded checkpointing, padding-free, optim adamw_torch as in the reference script,
                  and its SFTConfig default gradient_accumulation_steps=2: two batches per optimizer step)
  ours, 2k LoRA   ours_fused_ce, ours_smart_checkpointing, ours_padding_free, ours_packing (alone: sdpa's
                  dense block-diagonal mask), ours_packing_padding_free, ours_adamw_8bit, ours_all (all five),
                  ours_all_lean (all five, smart_checkpointing {mlp_chunks: 8, keep_last_on_gpu: 0}),
                  ours_all_lean_mlp (all five, smart_checkpointing {lean_mlp: true, lean_norm: false,
                  keep_last_on_gpu: 0}),
                  ours_all_lean_recompute (the same with lean_norm: true too)
  2k full FT      trl_full_ft (TRL defaults, adamw_torch_fused), ours_all_full_ft (all five); lr 2e-5
  16k LoRA        long_trl_default, long_trl_liger, long_ours_all: batch 1, one 16,383-token sample per
                  step (``--long-tokens``), an OOM is recorded as "OOM" (``--long-mem-cap-gib`` caps memory)

Figures (see _e2e_arms.py for the exact definitions): real tokens/s (non-pad input tokens, counted from
what the model is called with, identically for every arm, Unsloth included), s/step, MFU (model FLOPs:
LoRA 4*N_matmul + 6*N_lora per token, full FT 6*N_matmul, plus causal attention 6*layers*D*sum(L^2);
recompute not counted; peak 790 TFLOP/s), peak ``max_memory_allocated``, final loss, per-step losses
and a loss-parity note for the arms that see the same batches as trl_default. Steps 1..warmup are
not timed (compilation, Triton autotuning, pinned-buffer growth); timing is ``torch.cuda.synchronize``
at every step end. ``--profile ARM,...`` runs 3 more steps of those arms under torch.profiler (after
the timed window) and records where the device time goes. The JSON is rewritten after every arm.

    # on the GPU machine, from the repository root (Unsloth's sources on --unsloth-pythonpath; its pinned
    # wheels, from --unsloth-wheels, are installed into --unsloth-site by the script itself when missing)
    python benchmarks/end_to_end.py --arms set1 --out e2e_1.json     # ~8 min each; the JSON is
    python benchmarks/end_to_end.py --arms set2 --out e2e_2.json     # rewritten after every arm
    # merge, table, plot (matplotlib)
    python benchmarks/end_to_end.py --merge e2e_1.json e2e_2.json --out benchmarks/results/end_to_end_h200.json \\
        --plot docs/end_to_end_h200.png
    python benchmarks/end_to_end.py --smoke --out /tmp/e2e_smoke.json        # CPU check of the script itself
    python benchmarks/end_to_end.py --quant 4bit --arms trl_default,unsloth_packing,ours_all --out qlora.json
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import _common  # benchmarks/_common.py: puts the checkout on sys.path
from sft_plugins.ablate._runner import run_arm_subprocess

T_START = time.time()
ROOT = _common.ROOT
CHILD = Path(__file__).resolve().parent / "_e2e_arms.py"
TARGET_SPEEDUP = 1.5  # ours all five vs the best peer, at no more peak memory than it
# an arm whose second half of timed steps ran this much faster (tokens/s) than its first was still warming up
WARMING_UP = 1.10
ALL = ["packing", "padding_free", "fused_ce", "smart_checkpointing", "adamw_8bit"]
NO_CHECKPOINTING = [n for n in ALL if n != "smart_checkpointing"]
FULL_FT_LR = 2e-5
LEAN = {"mlp_chunks": 8, "keep_last_on_gpu": 0}
LEAN_RECOMPUTE = {"lean_mlp": True, "lean_norm": True, "keep_last_on_gpu": 0}


def _arm(kind: str = "trl", trl: dict[str, Any] | None = None, ours: list[str] | None = None, *, peer: bool = False,
         lora: bool = True, workload: str = "short", needs: str | None = None,
         options: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"kind": kind, "trl": trl or {}, "ours": ours or [], "peer": peer, "lora": lora, "workload": workload,
            "needs": needs, "options": options or {}}


ARMS: dict[str, dict[str, Any]] = {
    "trl_default": _arm(peer=True),
    "trl_padding_free": _arm(trl={"padding_free": True, "max_length": None}, peer=True),
    "trl_packing_bfd": _arm(trl={"packing": True}, peer=True),
    "trl_liger_packing": _arm(trl={"use_liger_kernel": True, "packing": True}, peer=True, needs="liger"),
    "ours_fused_ce": _arm(ours=["fused_ce"]),
    "ours_smart_checkpointing": _arm(ours=["smart_checkpointing"]),
    "ours_padding_free": _arm(ours=["padding_free"]),
    "ours_packing_padding_free": _arm(ours=["packing", "padding_free"]),
    "ours_adamw_8bit": _arm(ours=["adamw_8bit"]),
    "ours_all": _arm(ours=ALL),
    "ours_fused_lora": _arm(ours=["fused_lora"]),
    "ours_all_fused_lora": _arm(ours=ALL + ["fused_lora"]),
    # smart_checkpointing's memory_budget: the first step measures, then as many layers as fit run whole
    "ours_all_budget_auto": _arm(ours=ALL, options={"smart_checkpointing": {"memory_budget": "auto"}}),
    "ours_all_budget_0.3": _arm(ours=ALL, options={"smart_checkpointing": {"memory_budget": 0.3}}),
    "ours_all_fused_lora_budget_auto": _arm(ours=ALL + ["fused_lora"],
                                            options={"smart_checkpointing": {"memory_budget": "auto"}}),
    # the other end of the memory curve: no checkpointing at all (TRL's gradient_checkpointing off)
    "ours_all_no_checkpointing": _arm(trl={"gradient_checkpointing": False}, ours=NO_CHECKPOINTING),
    "ours_all_fused_lora_no_checkpointing": _arm(trl={"gradient_checkpointing": False},
                                                 ours=NO_CHECKPOINTING + ["fused_lora"]),
    # the least GPU memory: every checkpoint off the GPU, each layer's MLP recomputed in 8 sequence chunks
    "ours_all_lean": _arm(ours=ALL, options={"smart_checkpointing": LEAN}),
    # the lean SwiGLU recompute (3 intermediate-sized tensors at the MLP's peak instead of ~8), no extra pass
    "ours_all_lean_mlp": _arm(ours=ALL, options={"smart_checkpointing": {"lean_mlp": True, "lean_norm": False,
                                                                          "keep_last_on_gpu": 0}}),
    # ... and the fused RMSNorms in the recompute (no fp32 copies of the norms' inputs)
    "ours_all_lean_recompute": _arm(ours=ALL, options={"smart_checkpointing": LEAN_RECOMPUTE}),
    # PEFT's own fp32 cast of every LoRA input (smart_checkpointing's lean_lora_cast off): what that option buys
    "ours_all_peft_lora_cast": _arm(ours=ALL, options={"smart_checkpointing": {"lean_lora_cast": False}}),
    "unsloth_default": _arm("unsloth", peer=True, needs="unsloth"),
    "unsloth_packing": _arm("unsloth", {"packing": True}, peer=True, needs="unsloth"),
    "trl_full_ft": _arm(trl={"optim": "adamw_torch_fused"}, peer=True, lora=False),
    "ours_all_full_ft": _arm(ours=ALL, lora=False),
    "long_trl_default": _arm(peer=True, workload="long"),
    "long_trl_liger": _arm(trl={"use_liger_kernel": True}, peer=True, workload="long", needs="liger"),
    "long_ours_all": _arm(ours=ALL, workload="long"),
    "ours_packing": _arm(ours=["packing"]),
}
# any other memory_budget by name, for the tokens/s-vs-memory curve: ours_all_budget_12 (GiB), _budget_0.5 (a
# fraction of the device), ours_all_fused_lora_budget_...
BUDGET_ARM = re.compile(r"(ours_all(?:_fused_lora)?)_budget_(auto|tight|\d+(?:\.\d+)?)")


def arm_spec(name: str) -> dict[str, Any] | None:
    if name in ARMS:
        return ARMS[name]
    m = BUDGET_ARM.fullmatch(name)
    if m is None:
        return None
    value: str | float = m[2] if m[2] in ("auto", "tight") else float(m[2])
    return _arm(ours=ARMS[m[1]]["ours"], options={"smart_checkpointing": {"memory_budget": value}})


# the two GPU commands, most important arms first (a budget cut skips the tail, recorded as skipped)
SETS = {"set1": ["trl_default", "trl_packing_bfd", "trl_liger_packing", "ours_packing_padding_free", "ours_all",
                 "trl_padding_free", "ours_padding_free", "ours_fused_ce", "ours_smart_checkpointing",
                 "ours_adamw_8bit"],
        "set2": ["unsloth_packing", "unsloth_default", "long_trl_default", "long_trl_liger", "long_ours_all",
                 "trl_full_ft", "ours_all_full_ft", "ours_packing"]}
# arms that see exactly trl_default's batches (same sampler seed, one sample per row): loss parity reference
PARITY = {"ours_fused_ce": 1e-3, "ours_smart_checkpointing": 1e-5, "ours_padding_free": 1e-3, "trl_padding_free": None,
          "ours_adamw_8bit": None}


def workload(kind: str, smoke: bool, long_tokens: int, steps: int, preset: str | None = None,
             quant: str | None = None) -> dict[str, Any]:
    if smoke:
        base = {"preset": "tiny", "vocab": 512, "n": 200, "maxlen": 256, "batch": 4, "max_pos": 4096}
        long_tokens = min(long_tokens, 512)
    else:
        base = {"preset": preset or "llama-3.2-1b-shape", "vocab": 128256, "n": 4000, "maxlen": 2048, "batch": 8,
                "max_pos": 8192}
    if quant:  # QLoRA: the saved model loaded NF4 + double quant, bf16 compute; optim adamw_8bit (the recipe)
        base["quant"] = quant
    if kind == "long":  # one sample of long_tokens - 1 ids per step (+ nothing: TRL adds no EOS to input_ids data)
        base.update(n=steps + 8, maxlen=long_tokens, batch=1, fixed_len=long_tokens - 1,
                    max_pos=max(base["max_pos"], 2 * long_tokens))
    return base


def versions() -> dict[str, str | None]:
    return _common.versions(("torch", "transformers", "trl", "peft", "accelerate", "datasets", "triton",
                             "bitsandbytes", "liger-kernel"))


# -- running children -------------------------------------------------------------------------------
def run_child(spec: dict[str, Any], timeout: float, pythonpath: str | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath if pythonpath is not None else os.pathsep.join(
        [str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # own process group, so a timeout takes down the child's helpers too (only the group this script started)
    run = run_arm_subprocess([sys.executable, str(CHILD), json.dumps(spec)], max(1.0, timeout), env=env, cwd=ROOT)
    wall = round(run["wall_s"], 1)
    if run["timed_out"]:
        return {"status": "timeout", "error": f"killed after {timeout:.0f} s", "wall_s": wall}
    out, err = run["stdout"], run["stderr"]
    tail = " | ".join((err or out).strip().splitlines()[-8:])[-1500:]
    res = run["result"] if run["result"] is not None else {
        "status": "error", "error": f"no result; exit code {run['returncode']}: {tail}"}
    if res.get("status") == "error":
        res["stderr_tail"] = (err or "").strip().splitlines()[-25:]
    res["wall_s"] = wall
    return res


def unsloth_ready(a: argparse.Namespace, deadline: float) -> str | None:
    """Install Unsloth's pins into --unsloth-site when missing; None when ready, else why not."""
    entries = a.unsloth_pythonpath.split(os.pathsep)
    if not any((Path(e) / "unsloth" / "__init__.py").exists() for e in entries):
        return f"Unsloth sources not found on --unsloth-pythonpath ({a.unsloth_pythonpath}): put Unsloth's sources there"
    site = Path(a.unsloth_site)
    if (site / "unsloth_zoo").exists():
        return None
    wheels = sorted(glob.glob(os.path.join(a.unsloth_wheels, "*.whl")))
    if not wheels:
        return f"no wheels in {a.unsloth_wheels} and {site} missing: give --unsloth-wheels a folder of Unsloth's pinned wheels"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *wheels]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, min(300.0, deadline - time.time())))
    except subprocess.TimeoutExpired:
        return "pip install of Unsloth's wheels timed out"
    return None if p.returncode == 0 else "pip install failed: " + (p.stderr or p.stdout)[-800:]


def liger_ready() -> str | None:
    return None if importlib.util.find_spec("liger_kernel") else "liger_kernel is not importable"


# -- summary, table, plot ---------------------------------------------------------------------------
def second_half_speedup(r: dict[str, Any]) -> float | None:
    """Real tokens/s over the second half of an arm's timed steps over that of the first half: above
    :data:`WARMING_UP` the arm was still warming up when timing began (Unsloth's packed arm speeds up over
    its first ~10 steps and beyond), and a longer ``--warmup`` measures its steady state. None with fewer than
    4 timed steps."""
    n = r.get("timed_steps") or 0
    timed = (r.get("per_step") or [])[-n:] if n else []
    if len(timed) < 4:
        return None

    def rate(rows: list[dict[str, Any]]) -> float:
        return sum(x["real_tokens"] for x in rows) / max(sum(x["time_s"] for x in rows), 1e-9)

    half = len(timed) // 2
    return round(rate(timed[half:]) / max(rate(timed[:half]), 1e-9), 3)


def summarise(out: dict[str, Any]) -> None:
    arms = out["arms"]
    ok = {n: r for n, r in arms.items() if r.get("status") == "ok" and r.get("tokens_per_s")}
    for r in ok.values():
        r["second_half_speedup"] = second_half_speedup(r)
    peers = {n: r for n, r in ok.items() if r.get("peer") and r.get("workload") == "short" and r.get("lora")}
    summary: dict[str, Any] = {}
    if peers:
        best = max(peers, key=lambda n: peers[n]["tokens_per_s"])
        summary["best_peer"] = best
        for n, r in ok.items():
            if r.get("workload") == "short" and r.get("lora"):
                r["vs_best_peer"] = round(r["tokens_per_s"] / peers[best]["tokens_per_s"], 3)
        if "ours_all" in ok:
            o, b = ok["ours_all"], peers[best]
            mem_ok = None if o.get("peak_GiB") is None or b.get("peak_GiB") is None else o["peak_GiB"] <= b["peak_GiB"]
            speedup = o["tokens_per_s"] / b["tokens_per_s"]
            summary["target"] = {"ours_all_vs_best_peer_tokens_per_s": round(speedup, 3), "target": TARGET_SPEEDUP,
                                 "ours_all_peak_GiB": o.get("peak_GiB"), "best_peer_peak_GiB": b.get("peak_GiB"),
                                 "memory_le_best_peer": mem_ok, "met": bool(speedup >= TARGET_SPEEDUP and mem_ok),
                                 "warming_up": {n: ok[n]["second_half_speedup"] for n in ("ours_all", best)
                                                if (ok[n]["second_half_speedup"] or 0) > WARMING_UP}}
    for a_, b_ in (("ours_all_full_ft", "trl_full_ft"), ("long_ours_all", "long_trl_default")):
        if a_ in ok and b_ in ok:
            summary[f"{a_}_vs_{b_}"] = {"tokens_per_s": round(ok[a_]["tokens_per_s"] / ok[b_]["tokens_per_s"], 3),
                                        "peak_GiB": [ok[a_].get("peak_GiB"), ok[b_].get("peak_GiB")]}
    ref = arms.get("trl_default", {}).get("losses")
    parity = {}
    for n, promise in PARITY.items():
        mine = arms.get(n, {}).get("losses")
        if not ref or not mine:
            continue
        pairs = [(x, y) for x, y in zip(mine, ref) if x is not None and y is not None]
        rel = [abs(x - y) / max(abs(y), 1e-12) for x, y in pairs]
        if rel:
            parity[n] = {"vs": "trl_default", "steps": len(rel), "step1_rel_diff": float(f"{rel[0]:.3g}"),
                         "max_rel_diff": float(f"{max(rel):.3g}"), "final_rel_diff": float(f"{rel[-1]:.3g}"),
                         "promised_fp32": promise,
                         "note": "same batches; bf16 on the GPU, the promise is for fp32" if promise else
                         "not a parity arm (8-bit state / TRL's collator): step 1 (before any update) should match"}
    summary["loss_parity"] = parity
    out["summary"] = summary


def expected_wall_s(done: Iterable[dict[str, Any]], kind: str, default: float = 40.0) -> float:
    """The median wall time of the finished arms of this kind (``trl`` or ``unsloth``), else ``default``.

    Per kind because an Unsloth arm (its import and compilation) takes about three times ours: judged by
    their median, an arm of ours after one Unsloth arm was skipped with most of the budget left.
    """
    walls = sorted(r["wall_s"] for r in done if r.get("status") == "ok" and r.get("wall_s") and r.get("kind") == kind)
    return walls[len(walls) // 2] if walls else default


def _wl(out: dict[str, Any], r: dict[str, Any]) -> str:
    wl = (out.get("settings") or {}).get(r.get("workload")) or {}
    n = wl.get("maxlen", 0)
    lora = (" QLoRA" if wl.get("quant") else " LoRA") if r.get("lora") else " full FT"
    return (f"{n // 1024}k" if n >= 1024 else str(n)) + lora


def table(out: dict[str, Any]) -> str:
    rows = ["| arm | workload | s/step | real tok/step | real tok/s | MFU | peak GiB | final loss | vs best peer "
            "| notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in out.get("order", list(out["arms"])):
        r = out["arms"][n]
        wl = _wl(out, r)
        if r.get("status") != "ok" or not r.get("tokens_per_s"):
            why = r.get("reason") or r.get("error") or r.get("note") or ""
            rows.append(f"| {n} | {wl} | **{r.get('status')}** | | | | {r.get('peak_GiB') or ''} | | | "
                        f"{str(why)[:160].replace('|', '/')} |")
            continue
        attn = (r.get("attn_implementation") or "") + (f" ({r['packed_backend']})" if r.get("packed_backend") else "")
        loss = f"{r['final_loss']:.4f}" if isinstance(r.get("final_loss"), float) else ""
        rows.append(f"| {n} | {wl} | {r['s_per_step']:.3f} | {r['tokens_per_step']:,.0f} | {r['tokens_per_s']:,.0f} | "
                    f"{100 * r['mfu']:.1f}% | {r.get('peak_GiB')} | {loss} | {r.get('vs_best_peer', '')} | {attn} |")
    s = out.get("summary", {})
    if "target" in s:
        t = s["target"]
        rows.append(f"\nours_all vs best peer ({s['best_peer']}): {t['ours_all_vs_best_peer_tokens_per_s']}x real "
                    f"tokens/s (target {t['target']}x), peak {t['ours_all_peak_GiB']} vs {t['best_peer_peak_GiB']} "
                    f"GiB: {'met' if t['met'] else 'NOT met'}")
        for n, x in (t.get("warming_up") or {}).items():
            rows.append(f"  but {n} ran {x}x faster over the second half of its timed steps than the first: still warming "
                        "up, the ratio is not its steady state (a longer --warmup measures that)")
    for n, p in s.get("loss_parity", {}).items():
        rows.append(f"loss parity {n} vs trl_default: step 1 {p['step1_rel_diff']:.2e}, max {p['max_rel_diff']:.2e}, "
                    f"final {p['final_rel_diff']:.2e} relative over {p['steps']} steps ({p['note']})")
    if out.get("smoke"):
        rows.append("[smoke: tiny model on a shared CPU; figures check the script, they are not a measurement]")
    return "\n".join(rows)


def plot(out: dict[str, Any], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not importable: run --plot-only RESULTS.json --plot PATH where it is"
    names = [n for n in out.get("order", list(out["arms"])) if out["arms"][n].get("status") == "ok"
             and out["arms"][n].get("tokens_per_s")]
    if not names:
        return "no finished arm to plot"
    arms = out["arms"]
    colors = ["tab:gray" if arms[n].get("peer") else "tab:blue" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(names) + 1.6), sharey=True)
    ys = range(len(names))
    axes[0].barh(ys, [arms[n]["tokens_per_s"] for n in names], color=colors)
    axes[0].set_xlabel("real tokens/s (grey: peers, blue: ours)")
    axes[1].barh(ys, [arms[n].get("peak_GiB") or 0 for n in names], color=colors)
    axes[1].set_xlabel("peak GPU memory, GiB (max_memory_allocated)")
    labels = [f"{n}  [{_wl(out, arms[n])}]" for n in names]
    axes[0].set_yticks(list(ys), labels)
    axes[0].invert_yaxis()
    for i, n in enumerate(names):
        axes[0].text(arms[n]["tokens_per_s"], i, f" {arms[n]['tokens_per_s']:,.0f} ({100 * arms[n]['mfu']:.1f}% MFU)",
                     va="center", fontsize=8)
    fig.suptitle(f"end to end, {out.get('gpu') or 'CPU'}" + (" (smoke: not a measurement)" if out.get("smoke") else ""))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return None


def write(out: dict[str, Any], path: str | None) -> None:
    summarise(out)
    out["markdown"] = table(out)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1, default=str) + "\n")
        tmp.replace(path)


def merge(paths: list[str]) -> dict[str, Any]:
    """Later files win for an arm, unless they only skipped/timed it out where an earlier file has it ok."""
    merged: dict[str, Any] = {"arms": {}, "order": [], "commands": [], "merged_from": paths}
    for p in paths:
        d = json.loads(Path(p).read_text())
        for key in ("versions", "gpu", "smoke", "settings"):
            merged.setdefault(key, d.get(key))
        merged["commands"] += d.get("commands", [d.get("command")])
        for n in d.get("order", list(d["arms"])):
            r = d["arms"][n]
            old = merged["arms"].get(n)
            if old is not None and old.get("status") == "ok" and r.get("status") != "ok":
                continue
            merged["arms"][n] = {**r, "from": r.get("from", p)}  # which run measured it
            if n not in merged["order"]:
                merged["order"].append(n)
    merged["order"] = [n for n in ARMS if n in merged["arms"]] + [n for n in merged["order"] if n not in ARMS]
    return merged


# -- main -------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="results JSON (rewritten after every arm)")
    ap.add_argument("--arms", default="all", help="comma list of arms, or set1 / set2 / all: " + ",".join(ARMS))
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script itself")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 20; smoke 4)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 6; smoke 2)")
    ap.add_argument("--long-tokens", type=int, default=16384, help="tokens per step of the long-context arms")
    ap.add_argument("--long-mem-cap-gib", type=float, default=None, help="GPU memory cap for the long arms")
    ap.add_argument("--attention", default=None, help="padding_free attention option (default auto; smoke: loop)")
    ap.add_argument("--budget-s", type=float, default=None, help="no arm starts after this many seconds (480)")
    ap.add_argument("--hard-limit-s", type=float, default=None,
                    help="a running arm is killed at this time; no arm starts that would not end by then at the "
                    "median pace of finished arms of its kind (545)")
    ap.add_argument("--arm-timeout", type=float, default=180, help="seconds per arm")
    ap.add_argument("--append", action="store_true", help="keep the arms already in --out (re-run ones replaced)")
    ap.add_argument("--profile", default="", help="comma list of arms to profile for 3 steps after the timed ones")
    ap.add_argument("--profile-dir", default=None, help="profiler tables (and traces with --profile-trace) go here")
    ap.add_argument("--profile-trace", action="store_true", help="also write a chrome trace per profiled arm")
    ap.add_argument("--memory-snapshot", default="",
                    help="comma list of arms whose last timed step is recorded by the CUDA caching allocator: "
                    "the live tensors at that step's peak, grouped by where they were allocated")
    ap.add_argument("--unsloth-pythonpath", default=os.pathsep.join(
        ["/tmp/site-unsloth", f"{ROOT}/.gpu/unsloth/src", f"{ROOT}/.gpu/site", "/tmp/site"]))
    ap.add_argument("--unsloth-site", default="/tmp/site-unsloth", help="where Unsloth's pinned wheels get installed")
    ap.add_argument("--unsloth-wheels", default=f"{ROOT}/.gpu/unsloth/wheels")
    ap.add_argument("--model-dir", default="/tmp/e2e-rand-llama-1b", help="the model saved for Unsloth")
    ap.add_argument("--preset", default=None, help="model shape (default llama-3.2-1b-shape; e.g. llama-3-8b-shape)")
    ap.add_argument("--quant", default=None, choices=("4bit",),
                    help="QLoRA: every arm loads the saved model 4-bit (NF4, double quant, bf16 compute) and "
                    "trains LoRA with optim adamw_8bit (ours: the adamw_8bit plugin where composed)")
    ap.add_argument("--merge", nargs="+", default=None, help="merge these results JSONs into --out")
    ap.add_argument("--plot", default=None, help="bar plot (tokens/s, peak memory) to this PNG")
    ap.add_argument("--plot-only", default=None, help="plot this results JSON (with --plot) and exit")
    a = ap.parse_args()

    if a.plot_only or a.merge:
        out = json.loads(Path(a.plot_only).read_text()) if a.plot_only else merge(a.merge)
        if a.merge:
            write(out, a.out)
        print(out.get("markdown") or table(out))
        if a.plot:
            print(plot(out, a.plot) or f"plot: {a.plot}")
        return

    steps = a.steps or (4 if a.smoke else 20)
    warmup = a.warmup if a.warmup is not None else (2 if a.smoke else 6)
    budget = a.budget_s or (3600 if a.smoke else 480)
    hard = a.hard_limit_s or (7200 if a.smoke else 545)
    names: list[str] = []
    for tok in a.arms.split(","):
        for n in SETS.get(tok, list(ARMS) if tok == "all" else [tok]):
            if arm_spec(n) is None:
                ap.error(f"unknown arm {n!r}; arms: {', '.join(ARMS)}, or ours_all[_fused_lora]_budget_<value>")
            if n not in names:
                names.append(n)
    device = "cpu"
    if not a.smoke:
        import torch  # is_available() creates no CUDA context in this parent process

        device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = T_START  # the budget counts this process's own start-up too
    out: dict[str, Any] = {"arms": {}, "order": []}
    if a.append and a.out and Path(a.out).exists():
        out = json.loads(Path(a.out).read_text())
    cmd = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    out.update(command=cmd, commands=out.get("commands", []) + [cmd], versions=versions(), smoke=a.smoke,
               settings={"steps": steps, "timed_from_step": warmup + 1, "long_tokens": a.long_tokens,
                         "long_mem_cap_gib": a.long_mem_cap_gib, "peak_flops": 790e12, "lora": "r16 alpha16 all-linear",
                         "lr_lora": 2e-4, "lr_full_ft": FULL_FT_LR, "attn": "sdpa (ours: padding_free's choice)",
                         "short": workload("short", a.smoke, a.long_tokens, steps, a.preset, a.quant),
                         "long": workload("long", a.smoke, a.long_tokens, steps, a.preset, a.quant)})
    profile = set(filter(None, a.profile.split(",")))
    model_saved = False
    for n in names:
        arm = arm_spec(n)
        rec: dict[str, Any] = {"arm": n, "kind": arm["kind"], "plugins": arm["ours"], "trl_args": arm["trl"],
                               "peer": arm["peer"], "lora": arm["lora"], "workload": arm["workload"]}
        elapsed = time.time() - t0
        expect = expected_wall_s(out["arms"].values(), arm["kind"])
        reason = None
        if elapsed > budget or elapsed + expect > hard:
            reason = (f"budget: would start at {elapsed:.0f} s (--budget-s {budget:.0f}; a median {arm['kind']} arm "
                      f"takes {expect:.0f} s, --hard-limit-s {hard:.0f})")
        elif arm["needs"] == "liger":
            reason = liger_ready()
        elif arm["needs"] == "unsloth":
            reason = "Unsloth needs CUDA" if device != "cuda" else unsloth_ready(a, t0 + hard)
        if reason is None and (arm["kind"] == "unsloth" or a.quant) and not model_saved:
            wl = workload("short", a.smoke, a.long_tokens, steps, a.preset)  # the saved model is bf16 either way
            marker = Path(a.model_dir) / "e2e_workload.json"  # the folder holds this workload's model, not another
            if not (Path(a.model_dir) / "config.json").exists() or not marker.exists() \
                    or json.loads(marker.read_text()) != wl:
                spec = {"kind": "save_model", "arm": "save_model", "device": device, "model_dir": a.model_dir,
                        "workload": wl}
                res = run_child(spec, min(a.arm_timeout, hard - (time.time() - t0)))
                out["save_model"] = res
                if res.get("status") != "ok":
                    reason = "saving the model for Unsloth failed: " + str(res.get("error"))[:300]
                else:
                    marker.write_text(json.dumps(wl))
            model_saved = reason is None
        if reason is not None:
            rec.update(status="skipped", reason=reason)
        else:
            spec = {"kind": arm["kind"], "arm": n, "device": device, "trl": arm["trl"], "ours": arm["ours"],
                    "options": arm["options"], "lora": arm["lora"], "lr": 2e-4 if arm["lora"] else FULL_FT_LR, "steps": steps, "warmup": warmup,
                    "attention": a.attention or ("loop" if a.smoke else "auto"), "model_dir": a.model_dir,
                    "workload": workload(arm["workload"], a.smoke, a.long_tokens, steps, a.preset, a.quant),
                    "mem_cap_gib": a.long_mem_cap_gib if arm["workload"] == "long" else None,
                    "profile": n in profile, "profile_steps": 3, "profile_dir": a.profile_dir,
                    "profile_trace": a.profile_trace,
                    "memory_snapshot": n in set(filter(None, a.memory_snapshot.split(",")))}
            pypath = a.unsloth_pythonpath if arm["kind"] == "unsloth" else None
            timeout = min(a.arm_timeout, hard - (time.time() - t0))
            rec.update(run_child(spec, timeout, pypath))
        out["arms"][n] = rec
        if rec.get("device_name") and not out.get("gpu"):
            out["gpu"] = rec["device_name"]
        if n not in out["order"]:
            out["order"].append(n)
        brief = {k: rec.get(k) for k in ("arm", "status", "tokens_per_s", "s_per_step", "mfu", "peak_GiB",
                                         "final_loss", "wall_s", "reason", "error") if rec.get(k) is not None}
        print(json.dumps(brief), flush=True)
        out["wall_s"] = round(time.time() - t0, 1)
        write(out, a.out)
    write(out, a.out)
    print(out["markdown"])
    rerun = [n for n in names if out["arms"][n].get("status") in ("skipped", "timeout")
             and not str(out["arms"][n].get("reason", "")).startswith(("liger", "Unsloth needs"))]
    if rerun:
        print(f"not run: --arms {','.join(rerun)} (another command, then --merge)")
    if a.plot:
        print(plot(out, a.plot) or f"plot: {a.plot}")
    print(f"wall {out['wall_s']} s")


if __name__ == "__main__":
    main()
