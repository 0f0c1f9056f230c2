#!/usr/bin/env bash
# H200 call 3 (session 2026-12-01c): smart_checkpointing's lean recompute now on by default ("auto"): its GPU tests,
# and the e2e arms it changes, next to Unsloth packing and TRL long context (set 4, merged into end_to_end_h200.json)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el pytest; timeout 120 python3 -m pytest -q -p no:warnings tests/test_plugin_smart_checkpointing.py tests/kernels/test_swiglu.py tests/kernels/test_rmsnorm.py -k "gpu or cuda or lean or swiglu or rmsnorm or llama or auto" > $OUT/gpu_pytest.log 2>&1; tail -3 $OUT/gpu_pytest.log
el e2e; timeout 420 python3 benchmarks/end_to_end.py --arms ours_all,unsloth_packing,ours_smart_checkpointing,long_ours_all,long_trl_default,ours_all_full_ft --memory-snapshot ours_all --budget-s 340 --hard-limit-s 410 --out $OUT/e2e_set4.json > $OUT/e2e.log 2>&1; grep -E "^\| (ours|unsloth|long|trl)" $OUT/e2e.log; grep -E "Error|error" $OUT/e2e.log | tail -3
el done
