#!/usr/bin/env bash
# H200 call 4 (session 2026-12-01e): run 8 of fused_ce with the final defaults (one-pass row kernel, first-block
# reference, 4096/4 plain and 4096/8 softcap programs); CUDA tests of the kernel and the plugin; the rows probe
# around the new defaults
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el pytest; timeout 100 python3 -m pytest -q -x -p no:warnings tests/kernels/test_fused_linear_cross_entropy.py tests/test_plugin_fused_ce.py > $OUT/gpu_pytest.log 2>&1; tail -1 $OUT/gpu_pytest.log; grep -E "^E " $OUT/gpu_pytest.log | head -5
el rows; timeout 90 python3 benchmarks/fused_ce_probe.py --parts rows --out $OUT/fused_ce_probe_rows3_h200.json > $OUT/probe.log 2>&1
python3 - $OUT/fused_ce_probe_rows3_h200.json <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(r["V"], r["softcap"], r["mode"], r["block_v"], r["num_warps"], r["programs_per_sm"], r["ms"], r["GB_per_s"])
PY
el bench; timeout 330 python3 benchmarks/fused_ce.py --iters 30 --profile --methods gemm_floor,gemm_floor_valid,ours,ours_stats,ours_two_pass,ours_ws1g,eager,trl_head,trl_head_metrics,liger,cce --out $OUT > $OUT/bench.log 2>&1; grep -E "^\| (llama|qwen|gemma)" $OUT/bench.log | head -70
el done
