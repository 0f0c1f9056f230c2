#!/usr/bin/env bash
# H200 call 6 (session 2026-12-01e): run 10 of fused_ce, all methods, the final code (a second full run beside run 8);
# before it, the steps probe on qwen2.5-7b and gemma2-2b (sorted step times vs GPU-busy time a step)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el steps; timeout 70 python3 benchmarks/fused_ce_probe.py --parts steps --step-shapes qwen2.5-7b,gemma2-2b --out $OUT/fused_ce_probe_steps_run10_h200.json 2>&1 | grep '^{' | cut -c1-400
el bench; timeout 330 python3 benchmarks/fused_ce.py --iters 30 --methods gemm_floor,gemm_floor_valid,ours,ours_stats,ours_two_pass,eager,trl_head,trl_head_metrics,liger,cce --out $OUT > $OUT/bench.log 2>&1; grep -E "^\| (llama|qwen|gemma)" $OUT/bench.log | head -8
el done
