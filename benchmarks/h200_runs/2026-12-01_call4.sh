#!/usr/bin/env bash
# one short H200 call: lean all-on arms (memory vs Unsloth), Unsloth default, the GPU tests of the fixed/new tests
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > $OUT/pip.log 2>&1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el lean; timeout 60 python3 benchmarks/end_to_end.py --arms ours_all_lean --budget-s 10 --hard-limit-s 58 --out $OUT/e2e_3a.json > $OUT/e2e_3a.log 2>&1; grep "^| ours" $OUT/e2e_3a.log
el lean_ws64; SFT_PLUGINS_CE_WORKSPACE_MB=64 timeout 60 python3 benchmarks/end_to_end.py --arms ours_all_lean --budget-s 10 --hard-limit-s 58 --out $OUT/e2e_3b.json > $OUT/e2e_3b.log 2>&1; grep "^| ours" $OUT/e2e_3b.log
el pytest; timeout 70 python3 -m pytest -q -k "cuda or gpu" tests/test_plugin_smart_checkpointing.py tests/test_plugin_adamw_8bit.py > $OUT/gpu_pytest.log 2>&1; tail -3 $OUT/gpu_pytest.log
el unsloth; timeout 130 python3 benchmarks/end_to_end.py --arms unsloth_default --budget-s 10 --hard-limit-s 128 --out $OUT/e2e_3c.json > $OUT/e2e_3c.log 2>&1; grep "^| unsl" $OUT/e2e_3c.log
el done
