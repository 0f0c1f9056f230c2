"""smart_checkpointing vs no checkpointing, HF checkpointing and TRL activation offloading (LoRA).

Arms, all on the same random-initialised model with LoRA r=16 on all linear layers, batch 1:
- ``none``: no checkpointing.
- ``hf``: transformers' checkpointing as TRL turns it on (``gradient_checkpointing_enable`` with
  ``use_reentrant=False`` + ``enable_input_require_grads``).
- ``trl_offload``: ``hf`` + TRL's ``get_act_offloading_ctx_manager`` around forward and backward, what
  ``SFTConfig(activation_offloading=True)`` does with TRL's default (non-reentrant) checkpointing.
- ``trl_offload_reentrant``: the same with reentrant checkpointing (then the recompute in backward
  runs under TRL's hooks too, so its activations are offloaded as well).
- ``ours``: ``sft_plugins.compose(["smart_checkpointing"])`` with its defaults (these include the lean
  recompute, ``lean_mlp``/``lean_norm: "auto"``; ``ours`` in smart_checkpointing_h200.json predates it).
- ``ours_lean`` (1B shape): ``prefetch: 0, keep_last_on_gpu: 0, mlp_chunks: 8``: every input off the GPU
  and brought back on demand, and each layer's MLP recomputed in 8 sequence chunks: the least GPU
  memory, for one more MLP forward per layer and unhidden copies.
- ``ours_lean_mlp`` (only when named in ``--arms``/``--cap-arms``): ``lean_mlp: true, lean_norm: false``, the
  fused SwiGLU recompute alone; ``ours_lean_recompute`` (the same): ``lean_mlp`` and ``lean_norm`` both true.

The loss is a chunked LM head + cross-entropy (each 2k-token chunk checkpointed), the same for every
arm, so the [tokens x 128k] logits do not hide what the decoder checkpoints cost (TRL's SFTTrainer
uses a chunked head too). The step (forward, backward, AdamW step on the LoRA weights) is timed by
hand after one warm-up step.

Figures: median step time (and the ratio to ``hf``); peak allocated GPU memory; GPU memory held when
the decoder stack ends (what the decoder keeps for backward: the checkpoints, for the checkpointing
arms) against the theoretical size of the checkpoints (layers x tokens x hidden x 2 bytes); the
fraction of checkpointed bytes ``ours`` moved off the GPU; and, under a fixed GPU memory cap
(``torch.cuda.set_per_process_memory_fraction``), the longest sequence each arm trains on.

    # H200, one run (~4-5 min): JSON to --out, markdown table on stdout
    python benchmarks/smart_checkpointing.py --out benchmarks/results/smart_checkpointing_h200.json
    # CPU check of the script itself (tiny model, short sequences, no memory figures)
    python benchmarks/smart_checkpointing.py --smoke --out /tmp/smart_checkpointing_smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import _common  # benchmarks/_common.py: puts the checkout on sys.path

GiB = 1 << 30
TARGET_OFFLOADED = 0.90
TARGET_STEP_RATIO = 1.03
CE_CHUNK = 2048


def versions() -> dict[str, str | None]:
    return _common.versions(("torch", "transformers", "trl", "peft", "accelerate", "sft-plugins"))


# -- model and step ---------------------------------------------------------------------------------

def build(preset: str, device: str, dtype: Any) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    from sft_plugins.embedded import build_model, build_tokenizer

    tok = build_tokenizer()
    # Built on the device directly: initialising 8B parameters on the CPU would take minutes.
    with torch.device(device):
        model = build_model(preset, tokenizer=tok, dtype=dtype, max_position_embeddings=131072)
    model.to(device)  # a no-op unless this transformers release built it on the CPU anyway
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    return model


def _ce_chunk(h: Any, weight: Any, labels: Any) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(F.linear(h, weight).float(), labels, reduction="sum")


class Stepper:
    """forward (decoder + chunked head), backward, AdamW on the trainable weights."""

    def __init__(self, model: Any):
        import torch

        self.model = model
        self.base = model.get_base_model()
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        self.decoder_end_mem: int | None = None
        self._hook = self.base.model.norm.register_forward_pre_hook(self._at_decoder_end)

    def close(self) -> None:
        self._hook.remove()
        self.opt = None

    def _at_decoder_end(self, module: Any, args: Any) -> None:
        import torch

        if torch.cuda.is_available() and args[0].is_cuda:
            self.decoder_end_mem = torch.cuda.memory_allocated()

    def step(self, ids: Any, ctx: Any = None) -> float:
        from torch.utils.checkpoint import checkpoint

        with ctx if ctx is not None else contextlib.nullcontext():
            h = self.base.model(input_ids=ids, use_cache=False).last_hidden_state
            h = h[:, :-1].reshape(-1, h.shape[-1])
            labels = ids[:, 1:].reshape(-1)
            weight = self.base.lm_head.weight
            loss = 0.0
            for i in range(0, h.shape[0], CE_CHUNK):
                loss = loss + checkpoint(_ce_chunk, h[i:i + CE_CHUNK], weight, labels[i:i + CE_CHUNK],
                                         use_reentrant=False)
            loss = loss / h.shape[0]
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


OURS_OPTIONS: dict[str, dict[str, Any]] = {
    "ours": {},
    "ours_lean": {"prefetch": 0, "keep_last_on_gpu": 0, "mlp_chunks": 8},
    "ours_lean_mlp": {"lean_mlp": True, "lean_norm": False},  # the fused SwiGLU only; only with --arms / --cap-arms
    "ours_lean_recompute": {"lean_mlp": True, "lean_norm": True},  # ... and fused RMSNorms; the same
}
ARMS = ("none", "hf", "trl_offload", "trl_offload_reentrant", *OURS_OPTIONS)


@contextlib.contextmanager
def arm_context(arm: str, model: Any):
    """Turn the arm's checkpointing on for the duration; yields the per-step context (TRL's) or None."""
    import sft_plugins

    base = model.get_base_model()
    if arm == "none":
        yield None
    elif arm.startswith("ours"):
        options = OURS_OPTIONS[arm]
        with sft_plugins.compose(["smart_checkpointing"], options={"smart_checkpointing": options}) as stack:
            stack.prepare(model=model)
            yield None
    else:
        reentrant = arm == "trl_offload_reentrant"
        emb = base.get_input_embeddings()
        hooks_before = dict(emb._forward_hooks)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if not getattr(base, "_require_grads_hooks", None) and not hasattr(base, "_require_grads_hook"):
            base.enable_input_require_grads()  # what TRL does for PEFT models (5.2x's enable already did)
        try:
            ctx = None
            if arm.startswith("trl_offload"):
                from trl.models import get_act_offloading_ctx_manager

                ctx = get_act_offloading_ctx_manager(model=model, warn_if_no_head=False)
            yield ctx
        finally:
            base.gradient_checkpointing_disable()
            base.disable_input_require_grads()
            emb._forward_hooks.clear()  # whatever either call left behind: the next arm starts clean
            emb._forward_hooks.update(hooks_before)


def _cleanup() -> None:
    import torch

    from sft_plugins.plugins.smart_checkpointing.offload import empty_host_cache

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        empty_host_cache()  # an arm's cached pinned blocks must not shrink the next arm's host budget


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(model: Any, arm: str, seq: int, steps: int, device: str) -> dict[str, Any]:
    """Time ``steps`` steps after one warm-up; memory figures on CUDA."""
    import torch

    from sft_plugins.plugins import smart_checkpointing as sc

    cfg = model.get_base_model().config
    row: dict[str, Any] = {"arm": arm, "seq": seq,
                           "ckpt_theory_gib": cfg.num_hidden_layers * seq * cfg.hidden_size * 2 / GiB}
    stepper = Stepper(model)
    gen = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=gen).to(device)
    cuda = device == "cuda"
    try:
        with arm_context(arm, model) as ctx:
            _cleanup()
            stepper.step(ids, ctx)  # warm-up: pinned buffers, cuBLAS/flash plans, optimizer state
            if arm.startswith("ours"):
                sc_patch = sc._ACTIVE[-1]
                sc_patch.offloader.reset_counters()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if cuda else 0
            times, losses = [], []
            for _ in range(steps):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                losses.append(stepper.step(ids, ctx))
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row.update(step_s=statistics.median(times), step_times=times, loss=losses[-1])
            if cuda:
                row.update(peak_gib=torch.cuda.max_memory_allocated() / GiB,
                           peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB,
                           static_gib=before / GiB,
                           decoder_held_gib=(stepper.decoder_end_mem - before) / GiB
                           if stepper.decoder_end_mem is not None else None)
            if arm.startswith("ours"):
                st = sc_patch.offloader.stats()
                row.update(offloaded_fraction=st["offloaded_fraction"], offload_stats=st)
    except Exception as exc:  # an arm that does not fit (or breaks) is a result, not the end of the run
        row.update(error="OOM" if _is_oom(exc) else f"{type(exc).__name__}: {exc}"[:500])
        if not _is_oom(exc):
            traceback.print_exc()
    finally:
        stepper.close()
        _cleanup()
    return row


def fits(model: Any, arm: str, seq: int, device: str) -> bool:
    import torch

    stepper = Stepper(model)
    ids = torch.randint(0, model.get_base_model().config.vocab_size, (1, seq)).to(device)
    try:
        with arm_context(arm, model) as ctx:
            _cleanup()
            stepper.step(ids, ctx)
        return True
    except Exception as exc:
        if not _is_oom(exc):
            raise
        return False
    finally:
        del ids
        stepper.close()
        _cleanup()


def max_seq(model: Any, arm: str, device: str, start: int, limit: int, probes: int) -> dict[str, Any]:
    """Longest fitting length: grow by 1.5x from ``start`` until OOM, then bisect (multiples of 1024)."""
    tried: dict[int, bool] = {}

    def probe(n: int) -> bool:
        if n not in tried:
            tried[n] = fits(model, arm, n, device)
        return tried[n]

    lo, hi, n = 0, None, start
    try:
        lo, hi = _search(probe, tried, n, limit, probes)
    except Exception as exc:  # a peer that breaks (not OOM) is reported, the run goes on
        traceback.print_exc()
        lo = max([k for k, ok in tried.items() if ok], default=0)
        return {"arm": arm, "max_seq": lo, "first_oom": hi, "probes": dict(sorted(tried.items())),
                "error": f"{type(exc).__name__}: {exc}"[:500]}
    return {"arm": arm, "max_seq": lo, "first_oom": hi, "probes": dict(sorted(tried.items()))}


def _search(probe: Any, tried: dict[int, bool], n: int, limit: int, probes: int) -> tuple[int, int | None]:
    lo, hi = 0, None
    while len(tried) < probes:
        if probe(n):
            lo = n
            if n >= limit:
                break
            n = min(limit, int(n * 1.5) // 1024 * 1024)
        else:
            hi = n
            if lo == 0:
                n = max(1024, n // 2 // 1024 * 1024)
                if n in tried:
                    break
                continue
            break
    while hi is not None and lo and hi - lo > 2048 and len(tried) < probes:
        mid = (lo + hi) // 2 // 1024 * 1024
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


# -- the run ----------------------------------------------------------------------------------------

def plan(smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"device": "cpu", "dtype": "float32", "steps": 1, "budget_s": 600,
                "models": [{"preset": "tiny", "seqs": [64, 128], "arms": ["none", "hf", "ours", "ours_lean"]}],
                "cap": None}
    all_arms = ["none", "hf", "trl_offload", "trl_offload_reentrant", "ours", "ours_lean"]
    return {
        "device": "cuda", "dtype": "bfloat16", "steps": 3, "budget_s": 330,
        "models": [
            {"preset": "llama-3.2-1b-shape", "seqs": [8192, 16384, 32768], "arms": all_arms},
            {"preset": "llama-3-8b-shape", "seqs": [8192, 16384, 32768],
             "arms": ["none", "hf", "trl_offload", "ours"], "none_max_seq": 8192, "steps_at": {32768: 2}},
        ],
        # 12 GiB for the 1B shape: weights + LoRA + one 2k-token head chunk take ~6 GiB, the rest is
        # what the decoder keeps plus one layer's recompute, so lengths stay short enough to probe fast.
        "cap": {"preset": "llama-3.2-1b-shape", "gib": 12.0, "arms": all_arms, "start": 8192,
                "limit": 131072, "probes": 7},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script")
    ap.add_argument("--budget-s", type=float, default=None, help="skip what starts after this many seconds")
    ap.add_argument("--models", default=None, help="comma-separated presets of the plan to run (default all)")
    ap.add_argument("--cap-only", action="store_true", help="only the max-sequence probes under the cap")
    ap.add_argument("--no-cap", action="store_true", help="skip the max-sequence probes")
    ap.add_argument("--cap-arms", default=None, help="comma-separated arms to probe under the cap, in order")
    ap.add_argument("--arms", default=None, help=f"comma-separated arms to time instead of each model's plan: {ARMS}")
    ap.add_argument("--merge", default=None, help="start from this earlier JSON (timing rows and cap results "
                    "kept; rows measured again replace them), so one table can come from several runs")
    args = ap.parse_args()

    import torch

    from sft_plugins.plugins.smart_checkpointing.offload import host_memory

    cfg = plan(args.smoke)
    if args.models:
        cfg["models"] = [m for m in cfg["models"] if m["preset"] in args.models.split(",")]
    for value in (args.arms, args.cap_arms):
        unknown = sorted(set((value or "").split(",")) - set(ARMS) - {""})
        if unknown:
            ap.error(f"unknown arms {unknown}; arms: {ARMS}")
    if args.arms:
        for m in cfg["models"]:
            m["arms"] = args.arms.split(",")
    if args.cap_arms and cfg["cap"]:
        cfg["cap"]["arms"] = args.cap_arms.split(",")
    if args.no_cap:
        cfg["cap"] = None
    budget = args.budget_s or cfg["budget_s"]
    device = cfg["device"]
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU machine", file=sys.stderr)
        return 2
    dtype = getattr(torch, cfg["dtype"])
    t_start = time.perf_counter()
    out: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "gpu_total_gib": torch.cuda.get_device_properties(0).total_memory / GiB if device == "cuda" else None,
        "versions": versions(), "plan": json.loads(json.dumps(cfg, default=str)), "timing": [], "cap": None,
        # ours sizes its default pinned budget from these (min(25% of total, 50% of available))
        "host_ram_gib": dict(zip(("total", "available"), (v / GiB for v in host_memory()))),
        "skipped": [],
    }
    if args.merge:
        earlier = json.loads(Path(args.merge).read_text())
        out["timing"], out["cap"] = earlier.get("timing", []), earlier.get("cap")
        out["merged_from"] = [earlier.get("command"), *earlier.get("merged_from", [])]

    def keep_row(row: dict[str, Any]) -> None:  # a re-measured row replaces the merged one
        key = (row["model"], row.get("seq"), row.get("arm"))
        out["timing"] = [r for r in out["timing"] if (r["model"], r.get("seq"), r.get("arm")) != key]
        out["timing"].append(row)

    def save() -> None:
        out["elapsed_s"] = time.perf_counter() - t_start
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))

    for mcfg in cfg["models"]:
        if time.perf_counter() - t_start > budget:
            out["skipped"].append(f"{mcfg['preset']}: time budget")
            continue
        t0 = time.perf_counter()
        model = build(mcfg["preset"], device, dtype)
        print(f"# built {mcfg['preset']} in {time.perf_counter() - t0:.1f}s", flush=True)
        for seq in ([] if args.cap_only else mcfg["seqs"]):
            for arm in mcfg["arms"]:
                if arm == "none" and seq > mcfg.get("none_max_seq", 1 << 30):
                    continue
                if time.perf_counter() - t_start > budget:
                    out["skipped"].append(f"{mcfg['preset']} {seq} {arm}: time budget")
                    continue
                steps = mcfg.get("steps_at", {}).get(seq, cfg["steps"])
                row = {"model": mcfg["preset"], **measure(model, arm, seq, steps, device)}
                keep_row(row)
                print(f"# {row['model']} {seq} {arm}: {row.get('step_s', row.get('error'))}", flush=True)
                save()
        cap = cfg["cap"]
        if cap and cap["preset"] == mcfg["preset"]:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(cap["gib"] * GiB / total)
            try:
                results = [r for r in (out["cap"] or {}).get("results", []) if r["arm"] not in cap["arms"]]
                for arm in cap["arms"]:
                    if time.perf_counter() - t_start > budget:
                        out["skipped"].append(f"cap {arm}: time budget")
                        continue
                    start = 2048 if arm == "none" else cap["start"]
                    results.append(max_seq(model, arm, device, start, cap["limit"], cap["probes"]))
                    print(f"# cap {cap['gib']} GiB {arm}: {results[-1]['max_seq']}", flush=True)
                    out["cap"] = {"gib": cap["gib"], "model": cap["preset"], "results": results}
                    save()
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0)
        del model
        _cleanup()

    out["targets"] = verdicts(out)
    save()
    print(table(out))
    return 0


def verdicts(out: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in out["timing"] if "step_s" in r]
    hf = {(r["model"], r["seq"]): r for r in rows if r["arm"] == "hf"}
    ours = [r for r in rows if r["arm"] == "ours"]
    ratios = {f"{r['model']}@{r['seq']}": r["step_s"] / hf[(r["model"], r["seq"])]["step_s"]
              for r in ours if (r["model"], r["seq"]) in hf}
    fractions = {f"{r['model']}@{r['seq']}": r.get("offloaded_fraction") for r in ours}
    result: dict[str, Any] = {
        "offloaded_fraction": fractions,
        "offloaded_ok": bool(fractions) and all((f or 0) >= TARGET_OFFLOADED for f in fractions.values()),
        "step_ratio_vs_hf": ratios,
        "step_ratio_ok": bool(ratios) and all(v <= TARGET_STEP_RATIO for v in ratios.values()),
    }
    if out.get("cap"):
        best = {r["arm"]: r["max_seq"] for r in out["cap"]["results"]}
        result["max_seq"] = best
        ours = max(best.get("ours", 0), best.get("ours_lean", 0))
        for peer in ("hf", "trl_offload", "trl_offload_reentrant"):
            if peer in best:
                result[f"max_seq_ok_vs_{peer}"] = ours > best[peer]
        peers = [k for k in result if k.startswith("max_seq_ok_vs_")]
        result["max_seq_ok"] = bool(peers) and all(result[k] for k in peers)
    return result


def table(out: dict[str, Any]) -> str:
    def f(v: Any, fmt: str = "{:.2f}") -> str:
        return "—" if v is None else fmt.format(v)

    hf = {(r["model"], r["seq"]): r.get("step_s") for r in out["timing"] if r["arm"] == "hf"}
    lines = [f"GPU: {out['gpu']}  ·  torch {out['versions']['torch']}, transformers "
             f"{out['versions']['transformers']}, trl {out['versions']['trl']}, peft {out['versions']['peft']}", "",
             "| model | seq | arm | step s | × hf | peak GiB | held at decoder end GiB | checkpoints (theory) GiB "
             "| off GPU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in out["timing"]:
        base = hf.get((r["model"], r["seq"]))
        ratio = r["step_s"] / base if r.get("step_s") and base else None
        step = f(r.get("step_s"), "{:.3f}") if "error" not in r else r["error"]
        lines.append(f"| {r['model']} | {r['seq']} | {r['arm']} | {step} | {f(ratio, '{:.3f}')} "
                     f"| {f(r.get('peak_gib'))} | {f(r.get('decoder_held_gib'))} | {f(r['ckpt_theory_gib'])} "
                     f"| {f(r.get('offloaded_fraction'), '{:.1%}')} |")
    if out.get("cap"):
        lines += ["", f"Longest sequence under a {out['cap']['gib']} GiB cap ({out['cap']['model']}, LoRA, batch 1):",
                  "", "| arm | max seq | first OOM |", "|---|---|---|"]
        for r in out["cap"]["results"]:
            lines.append(f"| {r['arm']} | {r['max_seq']} | {r['first_oom'] or '—'} |"
                         + (f" error: {r['error'][:80]}" if r.get("error") else ""))
    t = out.get("targets", {})
    lines += ["", f"Targets: off GPU ≥ {TARGET_OFFLOADED:.0%}: {t.get('offloaded_ok')}; step ≤ "
                  f"{TARGET_STEP_RATIO}× hf: {t.get('step_ratio_ok')}; longer max seq than hf and TRL: "
                  f"{t.get('max_seq_ok')}"]
    if out["skipped"]:
        lines.append(f"Skipped (time budget): {', '.join(out['skipped'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
