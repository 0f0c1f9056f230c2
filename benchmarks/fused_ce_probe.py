"""Probes behind the fused_ce kernel's defaults (H200): what benchmarks/fused_ce.py does not separate.

1. ``gemm``: cuBLAS time per row of the chunk GEMMs (logits = h_c @ W^T, dH = dlogits @ W, and the
   dW accumulation dW += dlogits^T @ h_c) against the chunk's row count C, for the benchmark's four
   heads: a C that fills cuBLAS's tiles costs less per row than one just past a tile edge.
2. ``tanh``: the softcap row kernel (two-pass) with each way of making tanh (``SFT_PLUGINS_CE_TANH``:
   0 sigmoid, 1 tanh.approx; the ex2 + rcp.approx variant timed in fused_ce_probe_h200.json as mode 2
   is gone from the kernel) and a few (BLOCK_V, warps): time, and the loss / grad_h error of
   the whole head against an fp32 reference, with the benchmark's small logits and with wide ones
   (std ~8, what a trained model produces; that is where an approximate tanh shows).
3. ``rows``: the row kernel alone, plain and softcap chunks: two-pass at its defaults, one-pass over
   (BLOCK_V, warps) and programs per SM.
4. ``gaps``: a trace of three steps timed as the benchmark times them: the GPU's idle gaps and the kernels
   around them, and the host cost of the memory queries made before the first GEMM.
5. ``dw``: the chunk GEMMs (dW accumulation as written and transposed, dH with a bf16 or fp32 output,
   logits) under cuBLAS and cuBLASLt.
6. ``steps``: the distribution of whole fwd+bwd step times of ``ours`` (20 steps) and the GPU-busy
   share of three profiled steps (sum of kernel times / wall): host gaps show as the difference.

Usage: python benchmarks/fused_ce_probe.py [--parts gemm,tanh,rows,dw,gaps,steps] --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import _common  # noqa: F401  (benchmarks/_common.py: puts the checkout on sys.path)
import fused_ce as bench  # benchmarks/fused_ce.py: shapes, reference, inputs

from sft_plugins.kernels import fused_linear_cross_entropy
from sft_plugins.kernels._function import _DEFAULT_WORKSPACE_CAP, _max_chunk_rows


def _workspace_rows(V: int, H: int) -> int:
    """The most rows the kernel's default workspace takes for a bf16 head (its own rule)."""
    return _max_chunk_rows(V, H, 2, "triton", _DEFAULT_WORKSPACE_CAP)


def _ms(fn, reps=10) -> float:
    fn()
    torch.cuda.synchronize()
    times = bench.cuda_times(fn, reps)
    return times[len(times) // 2]


def _head_inputs(name: str):
    """The benchmark's inputs for one head: 10% of labels ignored, hidden states that need a grad."""
    N, H, V, cap = bench.SHAPES[name]
    torch.manual_seed(0)
    w = torch.randn(V, H, device="cuda", dtype=bench.DT) / H**0.5
    y = torch.randint(0, V, (N,), device="cuda")
    y[torch.randperm(N, device="cuda")[: N // 10]] = bench.IGNORE
    h = (torch.randn(N, H, device="cuda", dtype=bench.DT) * 0.5).requires_grad_(True)
    return cap, w, y, h


def probe_gemm(out: dict) -> None:
    rows_out = []
    for name, (N, H, V, _cap) in bench.SHAPES.items():
        w = torch.randn(V, H, device="cuda", dtype=bench.DT) / H**0.5
        dw = torch.zeros(V, H, device="cuda", dtype=bench.DT)
        max_rows = _workspace_rows(V, H)
        cands = sorted(set(list(range(128, max_rows + 161, 32)) + [max_rows]))
        for C in cands:
            h = torch.randn(C, H, device="cuda", dtype=bench.DT)
            lg = torch.empty(C, V, device="cuda", dtype=bench.DT)
            dh = torch.empty(C, H, device="cuda", dtype=bench.DT)
            t_lg = _ms(lambda: torch.mm(h, w.t(), out=lg))
            t_dh = _ms(lambda: torch.mm(lg, w, out=dh))
            t_dw = _ms(lambda: dw.addmm_(lg.t(), h))
            r = {"shape": name, "H": H, "V": V, "C": C, "within_240MiB": C <= max_rows, "ms_logits": round(t_lg, 4),
                 "ms_dh": round(t_dh, 4), "ms_dw_addmm": round(t_dw, 4),
                 "us_per_row_frozen": round(1e3 * (t_lg + t_dh) / C, 3),
                 "us_per_row_trainable": round(1e3 * (t_lg + t_dh + t_dw) / C, 3),
                 "tflops_logits": round(2 * C * H * V / t_lg / 1e9, 1)}
            rows_out.append(r)
            print(json.dumps(r), flush=True)
            del h, lg, dh
        del w, dw
        torch.cuda.empty_cache()
    out["gemm"] = rows_out


def probe_tanh(out: dict) -> None:
    from sft_plugins.kernels._triton_ce import ce_rows_triton

    res = []
    C, V = 461, 256000
    buf0 = torch.randn(C, V, device="cuda", dtype=bench.DT) * 8
    buf = buf0.clone()
    labels = torch.randint(0, V, (C,), device="cuda")
    rows = torch.arange(C, device="cuda")
    loss = torch.zeros(C, device="cuda")
    configs = [(4096, 8), (2048, 4), (4096, 4), (4096, 16), (8192, 16), (2048, 8)]
    for mode in (0, 1):
        os.environ["SFT_PLUGINS_CE_TANH"] = str(mode)
        for blk, nw in configs:
            os.environ["SFT_PLUGINS_CE_BLOCK_V"] = str(blk)
            os.environ["SFT_PLUGINS_CE_NUM_WARPS"] = str(nw)
            for cap in (30.0, None):
                if cap is None and mode:
                    continue

                def fn():
                    buf.copy_(buf0)
                    ce_rows_triton(buf, rows, labels, None, None, loss, None, None, grad_scale=1.0, scale_t=None,
                                   logit_scale=1.0, softcap=cap, smoothing=0.0, write_grad=True)

                ms = _ms(fn, 20) - _ms(lambda: buf.copy_(buf0), 20)
                r = {"tanh": mode, "block_v": blk, "num_warps": nw, "softcap": cap, "rows": C, "V": V,
                     "ms": round(ms, 4), "GB_per_s": round(3 * C * V * 2 / (ms * 1e-3) / 1e9)}
                res.append(r)
                print(json.dumps(r), flush=True)
    for k in ("SFT_PLUGINS_CE_BLOCK_V", "SFT_PLUGINS_CE_NUM_WARPS"):
        del os.environ[k]
    # accuracy of the whole head, gemma2-2b shape, small (benchmark) and wide logits
    N, H, V, cap = bench.SHAPES["gemma2-2b"]
    torch.manual_seed(0)
    w = torch.randn(V, H, device="cuda", dtype=bench.DT) / H**0.5
    y = torch.randint(0, V, (N,), device="cuda")
    y[torch.randperm(N, device="cuda")[: N // 10]] = bench.IGNORE
    acc = []
    for label, scale in (("benchmark logits (std ~0.5)", 0.5), ("wide logits (std ~8)", 8.0)):
        h0 = torch.randn(N, H, device="cuda", dtype=bench.DT) * scale
        ref_loss, ref_dh, _ = bench.reference(h0, w, y, cap, True)
        for mode in (0, 1):
            os.environ["SFT_PLUGINS_CE_TANH"] = str(mode)
            h = h0.clone().requires_grad_(True)
            lv = fused_linear_cross_entropy(h, w, y, softcap=cap)
            lv.backward()
            r = {"logits": label, "tanh": mode, "loss": float(lv), "ref_loss": ref_loss,
                 "loss_rel_err": abs(float(lv) - ref_loss) / abs(ref_loss), "grad_h_rel_err": bench.rel(h.grad, ref_dh)}
            acc.append(r)
            print(json.dumps(r), flush=True)
        del h0, ref_dh
        torch.cuda.empty_cache()
    del os.environ["SFT_PLUGINS_CE_TANH"]
    out["tanh"] = {"row_kernel": res, "accuracy": acc}


def probe_rows(out: dict) -> None:
    """The row kernel alone on one chunk of each kind (plain and softcap): the two-pass kernel at its
    defaults, the one-pass kernel over (BLOCK_V, warps) and programs per SM. (An earlier version
    also timed a one-pass variant whose first reference was the label's logit, so a block's
    exp need not wait for its max: slower at every size but 16384/32; fused_ce_probe_rows2_h200.json.)"""
    from sft_plugins.kernels._triton_ce import ce_rows_triton

    res = []
    knobs = ("SFT_PLUGINS_CE_BLOCK_V", "SFT_PLUGINS_CE_NUM_WARPS", "SFT_PLUGINS_CE_PROGRAMS_PER_SM")
    variants = [("two_pass", 16384, 32, 0)]
    variants += [("one_pass", blk, nw, 0) for blk, nw in ((16384, 32), (8192, 8), (4096, 8), (4096, 4), (4096, 2),
                                                          (2048, 8), (2048, 4), (2048, 2), (1024, 2))]
    variants += [("one_pass", 4096, 4, k) for k in (8, 16)]
    for C, V, cap in ((922, 128256, None), (461, 256000, 30.0)):
        buf0 = torch.randn(C, V, device="cuda", dtype=bench.DT) * 4
        buf = buf0.clone()
        labels = torch.randint(0, V, (C,), device="cuda")
        rows = torch.arange(C, device="cuda")
        loss = torch.zeros(C, device="cuda")
        rfac = torch.empty(C, device="cuda")
        copy_ms = _ms(lambda: buf.copy_(buf0), 30)
        for mode, blk, nw, per_sm in variants:
            os.environ.update(SFT_PLUGINS_CE_BLOCK_V=str(blk), SFT_PLUGINS_CE_NUM_WARPS=str(nw),
                              SFT_PLUGINS_CE_PROGRAMS_PER_SM=str(per_sm))

            def fn():
                buf.copy_(buf0)
                ce_rows_triton(buf, rows, labels, None, None, loss, None, None, grad_scale=1.0, scale_t=None,
                               logit_scale=1.0, softcap=cap, smoothing=0.0, write_grad=True,
                               rfac_out=rfac if mode == "one_pass" else None)

            ms = _ms(fn, 30) - copy_ms
            passes = 2 if mode == "one_pass" else 3
            r = {"rows": C, "V": V, "softcap": cap, "mode": mode, "block_v": blk,
                 "num_warps": nw, "programs_per_sm": per_sm, "ms": round(ms, 4),
                 "GB_per_s": round(passes * C * V * 2 / (ms * 1e-3) / 1e9)}
            res.append(r)
            print(json.dumps(r), flush=True)
        del buf0, buf
    for k in knobs:
        os.environ.pop(k, None)
    out["rows"] = res


def probe_gaps(out: dict, shapes: list[str]) -> None:
    """Where a step's GPU time goes: a trace of 3 steps timed as benchmarks/fused_ce.py times them (sync
    between steps), the GPU's idle gaps between kernels, largest first, with the kernels around them,
    and the host cost of the calls made before the first GEMM."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    res = {"host_us": {}}
    dev = torch.device("cuda")
    for label, fn in (("mem_get_info", lambda: torch.cuda.mem_get_info(dev)),
                      ("memory_reserved+allocated", lambda: (torch.cuda.memory_reserved(dev), torch.cuda.memory_allocated(dev)))):
        fn()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        res["host_us"][label] = round((time.perf_counter() - t0) / 50 * 1e6, 1)
    for name in shapes:
        cap, w, y, h = _head_inputs(name)

        def step():
            h.grad = None
            fused_linear_cross_entropy(h, w, y, softcap=cap).backward()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                step()
                e.record()
                torch.cuda.synchronize()
        path = os.path.join(tempfile.mkdtemp(), "trace.json")
        prof.export_chrome_trace(path)
        ev = json.load(open(path))["traceEvents"]
        kern = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and "dur" in e),
                      key=lambda e: e["ts"])
        gaps = []
        for a, b in zip(kern, kern[1:]):
            g = b["ts"] - (a["ts"] + a["dur"])
            if g > 0:
                gaps.append((g, a["name"][:50], b["name"][:50]))
        gaps.sort(reverse=True)
        span = kern[-1]["ts"] + kern[-1]["dur"] - kern[0]["ts"]
        busy = sum(k["dur"] for k in kern)
        r = {"shape": name, "kernels": len(kern), "span_ms": round(span / 1e3, 3), "busy_ms": round(busy / 1e3, 3),
             "idle_ms_between_kernels": round(sum(g[0] for g in gaps) / 1e3, 3),
             "largest_gaps_us": [(round(g[0], 1), g[1], g[2]) for g in gaps[:12]],
             "gaps_over_50us": sum(1 for g in gaps if g[0] > 50)}
        res[name] = r
        print(json.dumps(r), flush=True)
        del w, h, y
        torch.cuda.empty_cache()
    out["gaps"] = res


def probe_steps(out: dict, shapes: list[str]) -> None:
    from torch.profiler import ProfilerActivity, profile

    res = []
    for name in shapes:
        cap, w, y, h = _head_inputs(name)
        for frozen in (True, False):
            w.requires_grad_(not frozen)

            def step():
                h.grad = None
                w.grad = None
                fused_linear_cross_entropy(h, w, y, softcap=cap).backward()

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            times = [round(t, 3) for t in bench.cuda_times(step, 20)]  # sorted
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) * 1e3
            busy = sum(ev.device_time_total for ev in prof.key_averages() if ev.device_time_total and
                       not ev.key.startswith(("aten::", "_FusedLinear", "autograd"))) / 1e3
            r = {"shape": name, "frozen_w": frozen, "ms_steps_sorted": times,
                 "ms_median": times[10], "ms_min": times[0], "kernel_ms_per_step": round(busy / 3, 3),
                 "profiled_wall_ms_per_step": round(wall / 3, 3)}
            res.append(r)
            print(json.dumps(r), flush=True)
        del w, h, y
        torch.cuda.empty_cache()
    out["steps"] = res


def probe_dw(out: dict) -> None:
    """The chunk GEMMs under cuBLAS's two front ends (``torch.backends.cuda.preferred_blas_library``):
    the trainable head's dW accumulation per chunk, dW[V, H] += G[C, V]^T @ Hs[C, H] in bf16, as written
    and as the transposed problem (dW^T += Hs^T @ G); dH = G @ W with a bf16 or an fp32 output; the logits
    GEMM. C is the rows the 240 MiB workspace allows. (A Triton dW GEMM that loads the dW tile before
    its K loop was 1.2-1.4x slower than cuBLAS on all four heads: fused_ce_dw_probe_h200.json, commit
    21908bb.)"""
    res = []
    for name, (N, H, V, _cap) in bench.SHAPES.items():
        rows = _workspace_rows(V, H)
        g = torch.randn(rows, V, device="cuda", dtype=bench.DT) * 1e-3
        hs = torch.randn(rows, H, device="cuda", dtype=bench.DT)
        w = torch.randn(V, H, device="cuda", dtype=bench.DT)
        dw = torch.randn(V, H, device="cuda", dtype=bench.DT)
        lg = torch.empty(rows, V, device="cuda", dtype=bench.DT)
        r = {"shape": name, "M": V, "N": H, "K": rows}
        for lib in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(lib)
            r[f"{lib}_logits_ms"] = _ms(lambda: torch.mm(hs, w.t(), out=lg))
            r[f"{lib}_dh_ms"] = _ms(lambda: torch.mm(g, w))
            try:
                r[f"{lib}_dh_fp32out_ms"] = _ms(lambda: torch.mm(g, w, out_dtype=torch.float32))
            except Exception as e:  # noqa: BLE001 - older torch: no out_dtype
                r[f"{lib}_dh_fp32out_ms"] = repr(e)[:120]
            r[f"{lib}_dw_addmm_ms"] = _ms(lambda: dw.addmm_(g.t(), hs))
            r[f"{lib}_dw_addmm_transposed_ms"] = _ms(lambda: dw.t().addmm_(hs.t(), g))
        torch.backends.cuda.preferred_blas_library("cublas")
        res.append(r)
        print(json.dumps(r), flush=True)
        del g, hs, w, dw, lg
        torch.cuda.empty_cache()
    out["dw"] = res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="gemm,tanh,steps")
    ap.add_argument("--step-shapes", default="llama3.2-1b,gemma2-2b")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = {"command": "python " + " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "versions": bench.versions(),
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    parts = a.parts.split(",")
    for part in ("gemm", "tanh", "rows", "dw", "gaps", "steps"):
        if part in parts:
            if part == "gaps":
                probe_gaps(out, a.step_shapes.split(","))
            elif part == "steps":
                probe_steps(out, a.step_shapes.split(","))
            else:
                globals()[f"probe_{part}"](out)
            with open(a.out, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
