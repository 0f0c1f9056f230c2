#!/usr/bin/env bash
# H200 call 6 (session 2026-12-01d): fused_ce benchmark run 5 (row-kernel defaults of call 4 + no allocator statistics
# in the hot path), 20 timed steps a method; the gaps probe again; CUDA tests of fused_ce and smart_checkpointing
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el bench; timeout 380 python3 benchmarks/fused_ce.py --iters 20 --profile --out $OUT > $OUT/bench.log 2>&1; grep -E "^\| (llama|qwen|gemma)" $OUT/bench.log | head -8
el gaps; timeout 60 python3 benchmarks/fused_ce_probe.py --parts gaps --out $OUT/fused_ce_probe_gaps2_h200.json 2>&1 | grep -o '"shape": "[^"]*", "kernels": [0-9]*, "span_ms": [0-9.]*, "busy_ms": [0-9.]*, "idle_ms_between_kernels": [0-9.]*'
el pytest; timeout 90 python3 -m pytest -q -p no:warnings tests/kernels/test_fused_linear_cross_entropy.py tests/test_plugin_fused_ce.py > $OUT/gpu_pytest.log 2>&1; tail -1 $OUT/gpu_pytest.log
timeout 80 python3 -m pytest -q -p no:warnings tests/test_plugin_smart_checkpointing.py -k "gpu or cuda" >> $OUT/gpu_pytest.log 2>&1; tail -1 $OUT/gpu_pytest.log
el done
