"""LM head + cross-entropy, forward+backward on one GPU: sft_plugins vs its peers, in one run.

Methods (same inputs, same process): the cuBLAS GEMM floor (3 GEMMs over all N with a trainable W,
2 with a frozen W), the same floor over the valid rows only, ours
(``sft_plugins.kernels.fused_linear_cross_entropy`` and its ``_stats`` variant), eager HF (bf16
logits upcast to fp32 + F.cross_entropy), TRL 1.16's ``ChunkedLogProbFunction`` as SFTTrainer calls
it (log-probs only, and with entropy + top-1), Liger's fused linear CE and Apple's CCE. The timing
and memory method is the one the peers' own CE benchmark uses (CUDA events around
fwd+bwd after warm-up, median; extra peak = max_memory_allocated above what is allocated between
steps, previous grads included). Inputs rotate between two hidden tensors.

Errors are against an fp32 reference (TF32 off) computed here on the same bf16 inputs: loss, and the
relative norm error of grad_h and grad_w.

Usage: python benchmarks/fused_ce.py [--shapes a,b] [--iters N] [--out DIR] [--profile]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import _common  # benchmarks/_common.py: puts the checkout on sys.path
from sft_plugins.kernels import fused_linear_cross_entropy, fused_linear_cross_entropy_stats

torch.backends.cuda.matmul.allow_tf32 = True  # as the peers' benchmark; bf16 GEMMs are unaffected
DEV = "cuda"
DT = torch.bfloat16
IGNORE = -100

SHAPES = {  # name: (N, H, V, softcap)
    "llama3-8b": (8192, 4096, 128256, None),
    "llama3.2-1b": (16384, 2048, 128256, None),
    "qwen2.5-7b": (8192, 3584, 152064, None),
    "gemma2-2b": (8192, 2304, 256000, 30.0),
}
PEERS = ("eager", "trl_head", "trl_head_metrics", "liger", "cce")


# ---------------------------------------------------------------------------------- methods
def eager(h, w, y, cap):
    logits = h @ w.t()
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits.float(), y, ignore_index=IGNORE)


def trl_head(h, w, y, cap, outputs=("log_probs",)):
    from trl.kernels import ChunkedLogProbFunction

    m = y != IGNORE
    lp = ChunkedLogProbFunction.apply(h[m], w, None, y[m], 1.0, 32768, cap, 1.0, outputs)[0]
    return -lp.sum() / m.sum().clamp(min=1)


def trl_head_metrics(h, w, y, cap):
    return trl_head(h, w, y, cap, ("log_probs", "entropy", "is_top1"))


_LIGER = {}


def liger(h, w, y, cap):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if cap not in _LIGER:
        _LIGER[cap] = LigerFusedLinearCrossEntropyLoss(softcap=cap) if cap else LigerFusedLinearCrossEntropyLoss()
    return _LIGER[cap](w, h, y)


def cce(h, w, y, cap):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(h, w, y, softcap=cap) if cap else linear_cross_entropy(h, w, y)


def ours(h, w, y, cap):
    return fused_linear_cross_entropy(h, w, y, softcap=cap)


def ours_stats(h, w, y, cap):
    # what the fused_ce plugin runs inside SFTTrainer: loss + entropy + top-1 for TRL's metrics
    return fused_linear_cross_entropy_stats(h, w, y, softcap=cap, reduction="mean").loss


def ours_dw_fp32(h, w, y, cap):
    return fused_linear_cross_entropy(h, w, y, softcap=cap, _dw_accum="fp32")


def _ours_with_env(name, var, value):
    """ours with one of the kernel's environment knobs set for the call."""
    def fn(h, w, y, cap):
        os.environ[var] = value
        try:
            return fused_linear_cross_entropy(h, w, y, softcap=cap)
        finally:
            del os.environ[var]

    fn.__name__ = name
    return fn


ours_split = _ours_with_env("ours_split", "SFT_PLUGINS_CE_DH_SPLIT", "auto")
ours_ws1g = _ours_with_env("ours_ws1g", "SFT_PLUGINS_CE_WORKSPACE_MB", "1024")
# softcap rows only: the portable tanh (exp + divide) instead of the hardware tanh.approx
ours_exact_tanh = _ours_with_env("ours_exact_tanh", "SFT_PLUGINS_CE_TANH", "0")
# the row kernel's two passes (read, read + write) instead of one (read + write)
ours_two_pass = _ours_with_env("ours_two_pass", "SFT_PLUGINS_CE_ONE_PASS", "0")
# the row kernel's fixed per-kernel default shape instead of the one it times at run time
ours_fixed_shape = _ours_with_env("ours_fixed_shape", "SFT_PLUGINS_CE_TUNE", "0")


def _chunk_variant(rows):
    def fn(h, w, y, cap):
        return fused_linear_cross_entropy(h, w, y, softcap=cap, _chunk_rows=rows)

    fn.__name__ = f"ours_c{rows}"
    return fn


def gemm_floor(h, w, y, cap, frozen):
    with torch.no_grad():
        lg = h @ w.t()
        lg @ w
        if not frozen:
            lg.t() @ h


def gemm_floor_valid(h, w, y, cap, frozen):
    with torch.no_grad():
        hv = h[y != IGNORE]
        gemm_floor(hv, w, None, cap, frozen)


# ------------------------------------------------------------------------------- reference
def reference(h, w, y, cap, frozen, rows=1024):
    """fp32 (TF32 off) loss, grad_h and grad_w of the mean CE, chunked over rows."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        wf = w.float()
        valid = y != IGNORE
        n = valid.sum().clamp(min=1).float()
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        dw = None if frozen else torch.zeros(w.shape, dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], rows):
            hf = h[s : s + rows].float()
            yc = y[s : s + rows]
            vc = (yc != IGNORE).float()
            z = hf @ wf.t()
            t = None
            if cap:
                t = torch.tanh(z / cap)
                z = cap * t
            lse = torch.logsumexp(z, -1)
            yy = yc.clamp(min=0)
            total += ((lse - z.gather(1, yy[:, None])[:, 0]) * vc).double().sum()
            p = torch.softmax(z, -1)
            p[torch.arange(len(yc), device=h.device), yy] -= 1.0
            p *= (vc / n)[:, None]
            if t is not None:
                p *= 1.0 - t * t
            dh[s : s + rows] = p @ wf
            if dw is not None:
                dw += p.t() @ hf
            del z, p, t
        return float(total / n.double()), dh, dw
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def rel(a, b):
    if a is None or b is None:
        return None
    return float((a.float() - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------- run
def cuda_times(fn, iters):
    """Sorted milliseconds of ``iters`` calls, each between CUDA events and followed by a device sync."""
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)


def run_case(method, hs, w, y, cap, frozen, ref, iters):
    name = method.__name__
    is_floor = name.startswith("gemm_floor")
    state = {"i": 0}

    def step():
        h = hs[state["i"] % len(hs)]
        state["i"] += 1
        for t in hs:
            t.grad = None
        w.grad = None
        if is_floor:
            method(h, w, y, cap, frozen)
            return None, h
        loss = method(h, w, y, cap)
        loss.backward()
        return loss, h

    out = {"method": name}
    try:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, h = step()
        torch.cuda.synchronize()
        out["peak_extra_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        if loss is not None:
            ref_loss, ref_dh, ref_dw = ref
            lv = float(loss.detach())
            out["loss"] = lv
            out["loss_rel_err"] = abs(lv - ref_loss) / abs(ref_loss)
            out["grad_h_rel_err"] = rel(h.grad, ref_dh)
            out["grad_w_rel_err"] = None if frozen else rel(w.grad, ref_dw)
        times = cuda_times(step, iters)
        out["ms_median"] = round(times[len(times) // 2], 3)
        out["ms_min"] = round(times[0], 3)
    except Exception as ex:  # report and go on with the next method
        out["error"] = repr(ex)[:400]
    for t in hs:
        t.grad = None
    w.grad = None
    torch.cuda.empty_cache()
    return out


def versions():
    return _common.versions(("torch", "triton", "trl", "liger-kernel", "cut-cross-entropy", "transformers"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of ours, first shape")
    ap.add_argument("--profile-shape", default="gemma2-2b")
    ap.add_argument("--frozen", default="both", choices=["both", "trainable", "frozen"])
    ap.add_argument("--methods", default="")
    ap.add_argument("--chunk-variants", default="", help="extra arms ours_c<R>: ours with R rows a chunk, e.g. 320,384")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "command": "python " + " ".join(sys.argv),
        "gpu": torch.cuda.get_device_name(),
        "versions": versions(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ignored_fraction": 0.1,
        "dtype": "bfloat16",
    }
    print(json.dumps(meta), flush=True)
    result = {**meta, "rows": []}
    all_methods = [gemm_floor, gemm_floor_valid, ours, ours_stats, ours_split, ours_ws1g, ours_exact_tanh,
                   ours_two_pass, ours_fixed_shape, ours_dw_fp32, eager, trl_head, trl_head_metrics,
                   liger, cce]
    keep = set(args.methods.split(",")) if args.methods else (
        {m.__name__ for m in all_methods} - {"ours_dw_fp32", "ours_split"})
    methods = [m for m in all_methods if m.__name__ in keep]
    for rows in filter(None, args.chunk_variants.split(",")):
        methods.append(_chunk_variant(int(rows)))
    # frozen first: the LoRA case matters most
    frozen_modes = {"both": (True, False), "trainable": (False,), "frozen": (True,)}[args.frozen]
    for frozen in frozen_modes:
        for name in args.shapes.split(","):
            N, H, V, cap = SHAPES[name]
            torch.manual_seed(0)
            h0 = torch.randn(N, H, device=DEV, dtype=DT) * 0.5
            w = (torch.randn(V, H, device=DEV, dtype=DT) / math.sqrt(H)).requires_grad_(not frozen)
            y = torch.randint(0, V, (N,), device=DEV)
            y[torch.randperm(N, device=DEV)[: N // 10]] = IGNORE  # 10% ignored, scattered
            hs = [h0.clone().requires_grad_(True), h0.clone().requires_grad_(True)]
            ref = reference(h0, w.detach(), y, cap, frozen)
            for m in methods:
                if frozen and m.__name__ in ("ours_dw_fp32", "ours_ws1g"):
                    continue  # no dW: the workspace size only matters for its accumulation
                if not cap and m.__name__ == "ours_exact_tanh":
                    continue
                r = run_case(m, hs, w, y, cap, frozen, ref, args.iters)
                r.update(shape=name, N=N, H=H, V=V, softcap=cap, frozen_w=frozen)
                print(json.dumps(r), flush=True)
                result["rows"].append(r)
            with open(os.path.join(args.out, "fused_ce.json"), "w") as f:
                json.dump(result, f, indent=1)  # after every row: a timeout keeps what was done
            if args.profile and name == args.profile_shape:
                from torch.profiler import ProfilerActivity, profile

                for _ in range(2):
                    ours(hs[0], w, y, cap).backward()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        hs[0].grad = None
                        w.grad = None
                        ours(hs[0], w, y, cap).backward()
                    torch.cuda.synchronize()
                tab = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
                tag = "frozen" if frozen else "trainable"
                with open(os.path.join(args.out, f"fused_ce_profile_{tag}.txt"), "w") as f:
                    f.write(f"3 steps of ours, {name}, {tag} W\n{tab}\n")
                print(tab, flush=True)
                hs[0].grad = None
                w.grad = None
            del hs, w, y, h0, ref
            torch.cuda.empty_cache()
    from sft_plugins.kernels import _triton_ce

    tuner = _triton_ce._one_pass_tuned  # what the row kernel chose at run time, per row shape (key)
    result["row_kernel_choice"] = {str(k): str(c) for k, c in (tuner.cache.items() if tuner else ())}
    path = os.path.join(args.out, "fused_ce.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    md_table = table(result)
    with open(os.path.join(args.out, "fused_ce.md"), "w") as f:
        f.write(md_table)
    print(md_table)


def table(result) -> str:
    rows = result["rows"]
    key = {}
    for r in rows:
        key[(r["shape"], r["frozen_w"], r["method"])] = r
    lines = [
        f"GPU: {result['gpu']}; {json.dumps(result['versions'])}; command: `{result['command']}`",
        "",
        "ms = median fwd+bwd; (MiB) = extra peak memory; err = loss relative error vs fp32.",
        "",
        "| shape | W | floor | floor (valid rows) | ours | ours+stats | eager HF | TRL head | TRL head+metrics"
        " | Liger | CCE | ours/floor | ours/best peer | ours MiB | ours err | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r, mem=False):
        if r is None:
            return "-"
        if "error" in r:
            return "ERR"
        s = f"{r['ms_median']:.1f}"
        if mem:
            s += f" ({r['peak_extra_MiB']:.0f})"
        return s

    seen = []
    for r in rows:
        k = (r["shape"], r["frozen_w"])
        if k not in seen:
            seen.append(k)
    for shape, frozen in seen:
        g = lambda m: key.get((shape, frozen, m))  # noqa: E731
        o, fl = g("ours"), g("gemm_floor")
        peers = [g(p) for p in PEERS if g(p) and "error" not in g(p)]
        best = min(peers, key=lambda r: r["ms_median"]) if peers else None
        ratio_f = o["ms_median"] / fl["ms_median"] if o and fl and "error" not in o else float("nan")
        ratio_p = o["ms_median"] / best["ms_median"] if o and best and "error" not in o else float("nan")
        ok = [ratio_f <= 1.10, ratio_p <= 0.90, o and o.get("peak_extra_MiB", 1e9) <= 256,
              o and o.get("loss_rel_err", 1) <= 1e-4]
        marks = "".join("✓" if x else "✗" for x in ok)
        lines.append(
            f"| {shape} | {'frozen' if frozen else 'trainable'} | {cell(fl)} | {cell(g('gemm_floor_valid'))}"
            f" | {cell(o, True)} | {cell(g('ours_stats'))} | {cell(g('eager'), True)} | {cell(g('trl_head'), True)}"
            f" | {cell(g('trl_head_metrics'))} | {cell(g('liger'), True)} | {cell(g('cce'), True)}"
            f" | {ratio_f:.3f} | {ratio_p:.3f} ({best['method'] if best else '-'}) |"
            f" {o.get('peak_extra_MiB') if o else '-'} | {o.get('loss_rel_err', float('nan')) if o else float('nan'):.1e} | {marks} |"
        )
    lines += ["", "targets: ours ≤ 1.10× floor · ≤ 0.90× best peer · ≤ 256 MiB extra · loss err ≤ 1e-4", ""]
    variants = ("ours_dw_fp32", "ours_ws1g", "ours_split", "ours_exact_tanh", "ours_two_pass", "ours_fixed_shape")
    extra = [r for r in rows if r["method"] in variants]
    if extra:
        lines += ["| shape | W | variant | ms | MiB | grad_w err | grad_h err |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["method"] in ("ours", "liger", "cce", "trl_head", "eager") + variants and "error" not in r:
                gw = r.get("grad_w_rel_err")
                lines.append(
                    f"| {r['shape']} | {'frozen' if r['frozen_w'] else 'trainable'} | {r['method']} | {r['ms_median']:.1f}"
                    f" | {r['peak_extra_MiB']:.0f} | {'-' if gw is None else f'{gw:.2e}'} | {r.get('grad_h_rel_err', float('nan')):.2e} |"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
