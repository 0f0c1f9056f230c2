#!/usr/bin/env bash
# H200 call 3 (session 2026-12-01e): the one-pass row kernel with a speculative first reference (the label's logit);
# CUDA tests of the kernel; the rows probe (two-pass vs one-pass x reference x (BLOCK_V, warps) x programs/SM);
# a quick benchmark of ours (defaults) against the floor, two-pass and CCE
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el pytest; timeout 80 python3 -m pytest -q -x -p no:warnings tests/kernels/test_fused_linear_cross_entropy.py > $OUT/gpu_pytest.log 2>&1; tail -1 $OUT/gpu_pytest.log; grep -E "^E " $OUT/gpu_pytest.log | head -5
el rows; timeout 200 python3 benchmarks/fused_ce_probe.py --parts rows --out $OUT/fused_ce_probe_rows2_h200.json > $OUT/probe.log 2>&1
python3 - $OUT/fused_ce_probe_rows2_h200.json <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(r["V"], r["softcap"], r["mode"], "spec" if r["spec"] else "-", r["block_v"], r["num_warps"], r["programs_per_sm"], r["ms"], r["GB_per_s"])
PY
tail -2 $OUT/probe.log | cut -c1-300
el bench; timeout 200 python3 benchmarks/fused_ce.py --iters 20 --methods gemm_floor,ours,ours_two_pass,cce --out $OUT > $OUT/bench.log 2>&1; grep -E "^\| (llama|qwen|gemma)" $OUT/bench.log | head -24
el done
