#!/usr/bin/env bash
# Prepared, NOT yet run: the H200 call the open points need next (issue 6: torchao side by side; issue 8: the
# lean SwiGLU recompute's GPU test, its end-to-end memory and speed). ~9 min. Rename with the date once run.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-torchao .gpu/unsloth/wheels/torchao-*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el pytest; timeout 90 python3 -m pytest -q -p no:warnings tests/test_plugin_smart_checkpointing.py tests/kernels/test_swiglu.py tests/test_plugin_adamw_8bit.py -k "lean or swiglu or cuda" > $OUT/gpu_pytest.log 2>&1; tail -3 $OUT/gpu_pytest.log
el e2e; timeout 150 python3 benchmarks/end_to_end.py --arms ours_all_lean_mlp,ours_all --memory-snapshot ours_all_lean_mlp --budget-s 100 --hard-limit-s 145 --out $OUT/e2e_lean_mlp.json > $OUT/e2e.log 2>&1; grep "^| ours" $OUT/e2e.log
el adamw; timeout 160 python3 benchmarks/adamw_8bit.py --torchao-site /tmp/site-torchao --budget-s 150 --arms fused_adamw,adamw_8bit,torchao_adamw8bit --profile --out $OUT/adamw_8bit_h200.json > $OUT/adamw.log 2>&1; grep -A5 "^| arm" $OUT/adamw.log
el sc; timeout 200 python3 benchmarks/smart_checkpointing.py --models llama-3.2-1b-shape --arms hf,ours,ours_lean_mlp --cap-arms ours_lean_mlp --budget-s 180 --out $OUT/sc_lean_mlp.json > $OUT/sc.log 2>&1; grep -E "^\| (llama|ours)" $OUT/sc.log
el done
