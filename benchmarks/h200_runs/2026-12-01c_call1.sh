#!/usr/bin/env bash
# H200 call 1 (session 2026-12-01c): lean_mlp GPU tests, e2e ours_all_lean_mlp vs ours_all (memory snapshot), adamw_8bit with torchao side by side
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-torchao .gpu/unsloth/wheels/torchao-*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el pytest; timeout 90 python3 -m pytest -q -p no:warnings tests/test_plugin_smart_checkpointing.py tests/kernels/test_swiglu.py tests/test_plugin_adamw_8bit.py -k "lean or swiglu or cuda" > $OUT/gpu_pytest.log 2>&1; tail -3 $OUT/gpu_pytest.log
el e2e; timeout 150 python3 benchmarks/end_to_end.py --arms ours_all_lean_mlp,ours_all --memory-snapshot ours_all_lean_mlp --budget-s 100 --hard-limit-s 145 --out $OUT/e2e_lean_mlp.json > $OUT/e2e.log 2>&1; grep "^| ours" $OUT/e2e.log
el adamw; timeout 140 python3 benchmarks/adamw_8bit.py --torchao-site /tmp/site-torchao --budget-s 120 --arms fused_adamw,adamw_8bit,torchao_adamw8bit --profile --out $OUT/adamw_8bit_h200.json > $OUT/adamw.log 2>&1; grep -A5 "^| arm" $OUT/adamw.log
el done
