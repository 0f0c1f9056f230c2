#!/usr/bin/env bash
# H200 call 4 (session 2026-12-01c): after the RMSNorm recompile fix, the padded smart_checkpointing arm and all-on again,
# with TRL default and Unsloth packing in the same run (set 5, merged into end_to_end_h200.json)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el pytest; timeout 60 python3 -m pytest -q -p no:warnings tests/kernels/test_rmsnorm.py tests/test_plugin_smart_checkpointing.py -k "rmsnorm or llama or lean_norm" > $OUT/gpu_pytest.log 2>&1; tail -2 $OUT/gpu_pytest.log
el e2e; timeout 330 python3 benchmarks/end_to_end.py --arms ours_smart_checkpointing,ours_all,unsloth_packing,trl_default --memory-snapshot ours_all --budget-s 260 --hard-limit-s 320 --out $OUT/e2e_set5.json > $OUT/e2e.log 2>&1; grep -E "^\| (ours|unsloth|long|trl)" $OUT/e2e.log; grep -E "Error|error" $OUT/e2e.log | tail -3
el done
