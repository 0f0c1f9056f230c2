"""adamw_8bit vs torch fused AdamW (and torchao AdamW8bit when importable): full fine-tuning.

Each arm runs in its own process (fresh allocator, peak-memory counter and compile caches) on the same
random-initialised model (seeded) and the same random token batch. The optimizer of every arm is the
one ``transformers.Trainer.create_optimizer`` builds: for the plugin arms from ``stack.prepare``'s
``optimizer_cls_and_kwargs``, for fused AdamW from ``optim="adamw_torch_fused"``, for torchao from
``optimizer_cls_and_kwargs=(torchao.optim.AdamW8bit, ...)``; so param groups are identical. The
training step is timed by hand (forward + backward + optimizer step + zero_grad) to keep data loading
out of the figures.

Figures per arm: optimizer state bytes (measured from the state tensors) and per parameter, overall
and for the 8-bit tensors only; GPU memory growth at the first optimizer step; peak allocated and
reserved memory; median step time and median optimizer-step time.

    # H200 (see docs/plugins/adamw_8bit.md for the full command with the staged wheels)
    python benchmarks/adamw_8bit.py --out benchmarks/results/adamw_8bit_h200.json
    # CPU check of the script itself (tiny model, a few steps)
    python benchmarks/adamw_8bit.py --smoke --out /tmp/adamw_8bit_smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # benchmarks/_common.py: puts the checkout on sys.path
from sft_plugins.ablate._runner import run_arm_subprocess

ROOT = _common.ROOT
ARMS = ("fused_adamw", "adamw_8bit", "hf_bnb_8bit", "adamw_8bit_no_fp32_emb", "adamw_8bit_paged", "torchao_adamw8bit")
TARGET_STATE_BYTES = 2.1
TARGET_STEP_RATIO = 1.10


def versions() -> dict[str, str | None]:
    return _common.versions(("torch", "transformers", "trl", "accelerate", "bitsandbytes", "torchao", "sft-plugins"))


def build_optimizer(arm: str, model: Any, lr: float, device: str) -> Any:
    """The optimizer ``Trainer.create_optimizer`` builds for ``arm`` (identical param groups)."""
    from transformers import Trainer, TrainingArguments

    import sft_plugins

    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="adamw8bit-bench-"), report_to="none",
                             use_cpu=device == "cpu", bf16=device != "cpu", learning_rate=lr,
                             weight_decay=0.01, optim="adamw_torch_fused", save_strategy="no")
    if arm == "fused_adamw":
        return Trainer(model=model, args=args).create_optimizer()
    if arm == "hf_bnb_8bit":  # what a user gets today from transformers alone: bitsandbytes' own step
        args.optim = "adamw_bnb_8bit"
        return Trainer(model=model, args=args).create_optimizer()
    if arm == "torchao_adamw8bit":
        from torchao.optim import AdamW8bit

        kwargs = dict(lr=lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=0.01)
        return Trainer(model=model, args=args, optimizer_cls_and_kwargs=(AdamW8bit, kwargs)).create_optimizer()
    options = {"no_fp32_emb": {"fp32_embeddings": False}, "paged": {"paged": True}}.get(
        arm.removeprefix("adamw_8bit").lstrip("_"), {})
    stack = sft_plugins.compose(["adamw_8bit"], options={"adamw_8bit": options})
    kwargs = stack.prepare(model=model, args=args)  # PluginError here is the arm's answer (e.g. paged on CPU)
    return Trainer(**kwargs).create_optimizer()


def run_arm(arm: str, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from sft_plugins.embedded import build_model, build_tokenizer
    from sft_plugins.plugins.adamw_8bit import state_bytes

    device = cfg["device"]
    cuda = device == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # the smoke run only checks the script; one thread is robust on shared CPUs
    dtype = getattr(torch, cfg["dtype"])
    tok = build_tokenizer()
    # build directly on the GPU: random init of 1.2B parameters on the host takes far longer
    try:
        with torch.device(device):
            model = build_model(cfg["preset"], tokenizer=tok, dtype=dtype)
    except Exception:  # a transformers release that ignores or rejects the device context
        model = build_model(cfg["preset"], tokenizer=tok, dtype=dtype).to(device)
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch = torch.randint(0, vocab, (cfg["batch"], cfg["seq"]), generator=gen).to(device)

    opt = build_optimizer(arm, model, cfg["lr"], device)
    model.train()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timer() -> Any:
        return torch.cuda.Event(enable_timing=True) if cuda else None

    # fp32 weights on the GPU means what Trainer(bf16=True) does with them: bf16 autocast over fp32
    # master weights, where torch AdamW state is fp32 (8 B/param) and 8-bit state saves the most
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and dtype == torch.float32
                else contextlib.nullcontext())
    step_ms: list[float] = []
    opt_ms: list[float] = []
    losses: list[float] = []
    first_step_growth = None
    total = cfg["warmup"] + cfg["steps"]
    for i in range(total):
        if i == cfg["warmup"] and cuda:
            torch.cuda.reset_peak_memory_stats()  # peak of the steady state, state already allocated
        sync()
        t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        sync()
        before = torch.cuda.memory_allocated() if cuda else 0
        ev0, ev1 = timer(), timer()
        t1 = time.perf_counter()
        if cuda:
            ev0.record()
        opt.step()
        if cuda:
            ev1.record()
        if i == 0 and cuda:
            sync()
            first_step_growth = torch.cuda.memory_allocated() - before  # state is allocated lazily here
        opt.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        losses.append(float(loss.detach()))
        if i >= cfg["warmup"]:
            step_ms.append((t2 - t0) * 1e3)
            opt_ms.append(ev0.elapsed_time(ev1) if cuda else (t2 - t1) * 1e3)

    profile = profile_optimizer_step(opt, model, batch, autocast) if cfg.get("profile") else None
    state = state_bytes(opt)
    out: dict[str, Any] = {
        "arm": arm,
        "optimizer": f"{type(opt).__module__}.{type(opt).__qualname__}",
        "params": n_params,
        **state,
        "step_ms_median": statistics.median(step_ms),
        "step_ms_all": [round(x, 3) for x in step_ms],
        "optimizer_step_ms_median": statistics.median(opt_ms),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    if profile:
        out["optimizer_step_profile"] = profile
    if cuda:
        out.update(first_step_memory_growth_bytes=first_step_growth,
                   peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved())
    return out


def profile_optimizer_step(opt: Any, model: Any, batch: Any, autocast: Any, steps: int = 3) -> dict[str, Any]:
    """Where an optimizer step's time goes: host (Python + launches) vs device (kernels), top ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = batch.is_cuda
    host_ms: list[float] = []
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            with autocast:
                model(input_ids=batch, labels=batch).loss.backward()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.profiler.record_function("optimizer.step"):
                opt.step()
            host_ms.append((time.perf_counter() - t0) * 1e3)  # until the last launch returned
            if cuda:
                torch.cuda.synchronize()
            opt.zero_grad(set_to_none=True)
    events = [e for e in prof.events() if e.name == "optimizer.step"]
    kernels = [e for e in prof.key_averages() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    # the optimizer's own kernels: bitsandbytes' names contain "Optimizer"/"optimizer", torch's "adam"
    opt_kernels = [e for e in kernels if any(k in e.key.lower() for k in ("optimizer", "adam"))]
    return {
        "steps": steps,
        "host_ms_per_step": [round(x, 3) for x in host_ms],
        "record_function_cpu_ms": [round(e.cpu_time_total / 1e3, 3) for e in events],
        "optimizer_kernel_ms_per_step": round(sum(e.self_device_time_total for e in opt_kernels) / 1e3 / steps, 3),
        "optimizer_kernels": [{"name": e.key[:120], "calls": e.count,
                               "ms_per_step": round(e.self_device_time_total / 1e3 / steps, 3)}
                              for e in sorted(opt_kernels, key=lambda e: -e.self_device_time_total)[:6]],
    }


def child(arm: str, cfg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run one arm in a fresh interpreter; its result (or its failure) as a dict."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_arm", arm, "--_cfg", json.dumps(cfg)]
    # torchao lives in its own folder so that its presence cannot change the other arms' imports
    extra = cfg.get("torchao_site") if arm == "torchao_adamw8bit" else None
    path = os.pathsep.join(filter(None, [str(ROOT), extra, os.environ.get("PYTHONPATH")]))
    run = run_arm_subprocess(cmd, timeout_s, env={**os.environ, "PYTHONPATH": path})
    if run["timed_out"]:
        return {"arm": arm, "error": f"timed out after {timeout_s:.0f} s (--budget-s)", "arm_wall_s": round(timeout_s, 1)}
    wall = round(run["wall_s"], 1)
    if run["result"] is not None:
        return {**run["result"], "arm_wall_s": wall}
    tail = (run["stderr"] or run["stdout"]).strip().splitlines()[-6:]
    return {"arm": arm, "error": " | ".join(tail) or f"exit {run['returncode']}", "arm_wall_s": wall}


def gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    base = next((r for r in results if r["arm"] == "fused_adamw" and "error" not in r), None)
    rows = ["| arm | state GiB | state B/param (all) | B/param (8-bit tensors) | 8-bit params | peak alloc GiB "
            "| step ms | × fused | opt.step ms |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['arm']} | not run: {' '.join(r['error'].split())[:200]} | | | | | | | |")
            continue
        ratio = f"{r['step_ms_median'] / base['step_ms_median']:.3f}" if base else "-"
        q = r["bytes_per_param_8bit"]
        rows.append(
            f"| {r['arm']} | {gib(r['state_bytes'])} | {r['bytes_per_param']:.2f} | {'-' if q is None else f'{q:.3f}'} "
            f"| {r['params_8bit'] / max(r['params_with_state'], 1):.0%} | {gib(r.get('peak_allocated_bytes'))} "
            f"| {r['step_ms_median']:.1f} | {ratio} | {r['optimizer_step_ms_median']:.2f} |")
    return "\n".join(rows)


def verdicts(results: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["arm"]: r for r in results if "error" not in r}
    base = by.get("fused_adamw")
    out: dict[str, Any] = {}
    for arm in ("adamw_8bit", "hf_bnb_8bit", "adamw_8bit_no_fp32_emb", "adamw_8bit_paged"):
        r = by.get(arm)
        if r is None or base is None:
            continue
        ratio = r["step_ms_median"] / base["step_ms_median"]
        out[arm] = {
            "state_bytes_per_param_8bit_tensors": r["bytes_per_param_8bit"],
            "state_bytes_per_param_all": r["bytes_per_param"],
            "state_target_8bit_tensors_met": (r["bytes_per_param_8bit"] or 99) <= TARGET_STATE_BYTES,
            "state_target_all_params_met": r["bytes_per_param"] <= TARGET_STATE_BYTES,
            "step_time_ratio_vs_fused": ratio,
            "step_time_target_met": ratio <= TARGET_STEP_RATIO,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny preset, small batch, a few steps")
    ap.add_argument("--preset", default="llama-3.2-1b-shape")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="weights' dtype; float32 on CUDA trains under bf16 autocast (fp32 master weights)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (state allocation, torch.compile)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    ap.add_argument("--torchao-site", default=None,
                    help="folder holding torchao, added to the path of the torchao arm only")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="wall-clock budget for all arms (the GPU machine stops a command at 600 s)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed steps, profile 3 optimizer steps: host time vs kernel time")
    ap.add_argument("--_arm", help=argparse.SUPPRESS)
    ap.add_argument("--_cfg", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a._arm:  # child process
        try:
            result = run_arm(a._arm, json.loads(a._cfg))
        except Exception as exc:  # reported as the arm's result, e.g. a PluginError refusing paged on CPU
            result = {"arm": a._arm, "error": f"{type(exc).__name__}: {exc}"}
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import torch

    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    if a.smoke:
        cfg = dict(preset="tiny", dtype="float32", batch=2, seq=64, warmup=2, steps=4)
    else:
        cfg = dict(preset=a.preset, dtype=a.dtype, batch=a.batch, seq=a.seq, warmup=a.warmup, steps=a.steps)
    cfg.update(device=device, lr=a.lr, torchao_site=a.torchao_site, profile=a.profile)
    arms = [x for x in a.arms.split(",") if x]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        ap.error(f"unknown arms {unknown}; arms: {ARMS}")
    if a.smoke and a.arms == ",".join(ARMS):
        arms = [x for x in arms if x != "torchao_adamw8bit"]  # its CPU compile alone takes ~30 s

    t0 = time.time()
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "benchmark": "adamw_8bit",
        "command": " ".join(shlex.quote(x) for x in [Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({platform.processor() or 'x86_64'})",
        "versions": versions(),
        "config": cfg,
        "targets": {"state_bytes_per_param": TARGET_STATE_BYTES, "step_time_ratio_vs_fused": TARGET_STEP_RATIO},
    }

    def write() -> str:
        # written after every arm, so a run cut short by the machine's time limit keeps what it measured
        md = table(results)
        report.update(results=results, verdicts=verdicts(results), wall_s=round(time.time() - t0, 1), markdown=md)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(report, indent=1))
        return md

    for arm in arms:
        if arm == "torchao_adamw8bit" and not (a.torchao_site or _importable("torchao.optim")):
            results.append({"arm": arm, "error": "torchao is not importable here"})
            continue
        left = a.budget_s - (time.time() - t0)
        if left < 30:
            results.append({"arm": arm, "error": f"skipped: {a.budget_s:.0f} s budget spent"})
            continue
        results.append(child(arm, cfg, min(left, 300.0)))
        print(f"[{arm}] done in {results[-1]['arm_wall_s']} s" + (f": {results[-1]['error']}"
                                                                   if "error" in results[-1] else ""), flush=True)
        write()
    md = write()
    print(f"\n{report['device']}, {cfg['preset']} {cfg['dtype']}, batch {cfg['batch']}×{cfg['seq']}, "
          f"{cfg['steps']} timed steps after {cfg['warmup']}\n\n{md}\n")
    print(json.dumps(report["verdicts"], indent=1))
    if a.out:
        print(f"wrote {a.out}")
    return 0 if all("error" not in r for r in results if r["arm"] != "torchao_adamw8bit"
                    and not (a.smoke and r["arm"] == "adamw_8bit_paged")) else 1


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
