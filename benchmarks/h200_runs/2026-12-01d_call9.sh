#!/usr/bin/env bash
# H200 call 9 (session 2026-12-01d): fused_ce run 6 after the first chunk's GEMM is launched before the host reads
# the valid-row count; CUDA tests of the kernel and plugin; the gaps probe on llama3.2-1b
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el pytest; timeout 75 python3 -m pytest -q -x -p no:warnings tests/kernels/test_fused_linear_cross_entropy.py tests/test_plugin_fused_ce.py > $OUT/gpu_pytest.log 2>&1; tail -1 $OUT/gpu_pytest.log
el bench; timeout 160 python3 benchmarks/fused_ce.py --iters 16 --out $OUT > $OUT/bench.log 2>&1; grep -E "^\| (llama|qwen|gemma)" $OUT/bench.log | head -8
el gaps; timeout 25 python3 benchmarks/fused_ce_probe.py --parts gaps --step-shapes llama3.2-1b --out $OUT/fused_ce_probe_gaps3_h200.json 2>&1 | grep -o '"shape": "[^"]*", "kernels": [0-9]*, "span_ms": [0-9.]*, "busy_ms": [0-9.]*, "idle_ms_between_kernels": [0-9.]*'
el done
