#!/usr/bin/env bash
# H200 call 1 (session 2026-12-01d), prepared by session 2026-12-01c: what issue 8 still lacks on the H200.
# (1) our packing plugin alone in the end-to-end workload (every other arm is in end_to_end_h200.json);
# (2) the 16k long-context arms under a 5 GiB cap, so that what fits is the measure (uncapped, both fit).
# (3) GPU tests of the kernels and lean recompute after the 2026-12-01c review mends (not re-run on the GPU then).
# ~5 min. After it: merge e2e_packing.json into end_to_end_h200.json (as set 5), keep e2e_long_cap5.json apart.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el packing; timeout 120 python3 benchmarks/end_to_end.py --arms ours_packing --budget-s 60 --hard-limit-s 115 --out $OUT/e2e_packing.json > $OUT/e2e_packing.log 2>&1; grep -E "^\| ours" $OUT/e2e_packing.log
el long; timeout 240 python3 benchmarks/end_to_end.py --arms long_ours_all,long_trl_default,long_trl_liger --long-mem-cap-gib 5 --budget-s 170 --hard-limit-s 235 --out $OUT/e2e_long_cap5.json > $OUT/e2e_long.log 2>&1; grep -E "^\| (long|ours|trl)" $OUT/e2e_long.log
el pytest; timeout 90 python3 -m pytest -q -p no:warnings tests/kernels/test_swiglu.py tests/kernels/test_rmsnorm.py tests/test_plugin_smart_checkpointing.py -k "cuda or gpu or lean or rmsnorm or swiglu" > $OUT/gpu_pytest.log 2>&1; tail -2 $OUT/gpu_pytest.log
el done
