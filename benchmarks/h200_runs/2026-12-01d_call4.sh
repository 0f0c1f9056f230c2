#!/usr/bin/env bash
# H200 call 4 (session 2026-12-01d): fused_ce benchmark run 4 with the new row-kernel defaults (hardware tanh for
# bf16 softcap, 16384-wide blocks with 32 warps, pass 2 backwards without softcap), no --tune; then the CUDA tests
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el bench; timeout 420 python3 benchmarks/fused_ce.py --iters 12 --profile --chunk-variants 320,384,512,864 --out $OUT > $OUT/bench.log 2>&1; grep -E "^\| (llama|qwen|gemma)" $OUT/bench.log | head -40
el pytest; timeout 120 python3 -m pytest -q -p no:warnings tests/kernels/test_fused_linear_cross_entropy.py tests/test_plugin_fused_ce.py > $OUT/gpu_pytest.log 2>&1; tail -2 $OUT/gpu_pytest.log
el done
