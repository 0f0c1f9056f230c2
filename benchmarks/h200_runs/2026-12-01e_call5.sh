#!/usr/bin/env bash
# H200 call 5 (session 2026-12-01e): trainable rows with dW's GEMM on a second stream beside dH's (SFT_PLUGINS_CE_DW_STREAM)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el pytest; timeout 60 python3 -m pytest -q -x -p no:warnings tests/kernels/test_fused_linear_cross_entropy.py -k "stream or one_pass" > $OUT/gpu_pytest.log 2>&1; tail -1 $OUT/gpu_pytest.log; grep -E "^E " $OUT/gpu_pytest.log | head -5
el bench; timeout 200 python3 benchmarks/fused_ce.py --iters 30 --frozen trainable --methods gemm_floor,ours,ours_dw_stream,cce --out $OUT > $OUT/bench.log 2>&1; grep -E "^\| (llama|qwen|gemma)" $OUT/bench.log | head -30
el done
