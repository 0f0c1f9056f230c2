#!/usr/bin/env bash
# H200 call 2 (session 2026-12-01d): fused_ce probes (chunk GEMM cost vs rows, softcap tanh variants and their error,
# step-time distribution and GPU-busy share) -> benchmarks/results/fused_ce_probe_h200.json
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el probe; timeout 400 python3 benchmarks/fused_ce_probe.py --align 8,64,128,160,256 --out $OUT/fused_ce_probe_h200.json > $OUT/probe.log 2>&1; tail -3 $OUT/probe.log
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/fused_ce_probe_h200.json"))
for r in d.get("tanh", {}).get("row_kernel", []): print("row", r["tanh"], r["block_v"], r["num_warps"], r["softcap"], r["ms"], r["GB_per_s"])
for r in d.get("tanh", {}).get("accuracy", []): print("acc", r["logits"][:6], r["tanh"], "%.2e %.2e" % (r["loss_rel_err"], r["grad_h_rel_err"]))
for r in d.get("steps", []): print("step", r["shape"], r["frozen_w"], r["row_align"], r["ms_median"], r["ms_min"], r["kernel_ms_per_step"], r["profiled_wall_ms_per_step"])
best = {}
for r in d.get("gemm", []):
    if r["within_240MiB"]: best.setdefault(r["shape"], []).append((r["us_per_row_frozen"], r["us_per_row_trainable"], r["C"]))
for k, v in best.items(): print("gemm", k, "frozen best", sorted(v)[:4], "trainable best", sorted(v, key=lambda t: t[1])[:3])
PY
el done
