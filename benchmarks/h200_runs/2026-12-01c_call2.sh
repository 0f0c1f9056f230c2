#!/usr/bin/env bash
# H200 call 2 (session 2026-12-01c): GPU tests of lean_mlp (row chunks) / lean_norm / their kernels; e2e Unsloth packing
# next to ours_all_lean_recompute and ours_all_lean_mlp (memory snapshot); smart_checkpointing timing + 12 GiB cap probe
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el pytest; timeout 90 python3 -m pytest -q -p no:warnings tests/test_plugin_smart_checkpointing.py tests/kernels/test_swiglu.py tests/kernels/test_rmsnorm.py -k "lean or swiglu or rmsnorm or llama" > $OUT/gpu_pytest.log 2>&1; tail -3 $OUT/gpu_pytest.log
el e2e; timeout 260 python3 benchmarks/end_to_end.py --arms ours_all_lean_recompute,unsloth_packing,ours_all_lean_mlp --memory-snapshot ours_all_lean_recompute --budget-s 200 --hard-limit-s 255 --out $OUT/e2e_lean_recompute.json > $OUT/e2e.log 2>&1; grep -E "^\| (ours|unsloth)" $OUT/e2e.log; grep -E "error|Error" $OUT/e2e.log | tail -3
el sc; timeout 200 python3 benchmarks/smart_checkpointing.py --models llama-3.2-1b-shape --arms hf,ours,ours_lean_recompute --cap-arms ours_lean_recompute --budget-s 180 --out $OUT/sc_lean.json > $OUT/sc.log 2>&1; grep -E "^\| (llama|ours|hf)" $OUT/sc.log | head -20
el done
