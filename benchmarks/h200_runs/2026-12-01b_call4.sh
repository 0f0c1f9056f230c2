#!/usr/bin/env bash
# H200 call 4 (session 2026-12-01b): GPU tests after matching bitsandbytes' fp32 step constants; the final
# adamw_8bit timing (issue 6)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el pytest; timeout 90 python3 -m pytest -q --tb=line -p no:warnings tests/kernels/test_adam8bit_blockwise.py tests/test_plugin_adamw_8bit.py tests/test_plugin_smart_checkpointing.py -k "cuda or gpu or auto or equals_bitsandbytes or kernel or reference" > $OUT/gpu_pytest.log 2>&1; grep -E "^E |^/|FAILED|passed|failed" $OUT/gpu_pytest.log | cut -c1-300 | head -30
el adamw; timeout 110 python3 benchmarks/adamw_8bit.py --budget-s 100 --arms fused_adamw,adamw_8bit --profile --out $OUT/adamw_8bit_h200.json > $OUT/adamw.log 2>&1; grep -A4 "^| arm" $OUT/adamw.log
el done
