#!/usr/bin/env bash
# H200 call 7 (session 2026-12-01e): CUDA tests of the kernel and the plugin after the row kernels' helper refactor
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
timeout 120 python3 -m pytest -q -p no:warnings tests/kernels/test_fused_linear_cross_entropy.py tests/test_plugin_fused_ce.py > $OUT/gpu_pytest.log 2>&1; tail -1 $OUT/gpu_pytest.log; grep -E "^E |FAILED" $OUT/gpu_pytest.log | head -5
