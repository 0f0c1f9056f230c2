#!/usr/bin/env bash
# H200 call 3 (session 2026-12-01b): the GPU test failures of call 2, in short; smart_checkpointing with
# mlp_chunks="auto" as the default: 1B timing (hf, ours), the 12 GiB cap probe (ours), the Llama-3-8B rows
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el pytest; timeout 90 python3 -m pytest -q --tb=line -p no:warnings tests/kernels/test_adam8bit_blockwise.py tests/test_plugin_adamw_8bit.py tests/test_plugin_smart_checkpointing.py -k "cuda or gpu or auto or equals_bitsandbytes or kernel or reference" > /tmp/gpu_pytest.log 2>&1; grep -E "^E |Error|error|^/|FAILED|passed|failed" /tmp/gpu_pytest.log | cut -c1-400 | head -40
cp benchmarks/results/smart_checkpointing_h200.json $OUT/sc.json
el sc_1b; timeout 120 python3 benchmarks/smart_checkpointing.py --models llama-3.2-1b-shape --arms hf,ours --no-cap --budget-s 100 --merge $OUT/sc.json --out $OUT/sc.json > $OUT/sc.log 2>&1; grep "llama-3.2" $OUT/sc.log | head -8
el sc_cap; timeout 80 python3 benchmarks/smart_checkpointing.py --models llama-3.2-1b-shape --cap-only --cap-arms ours --budget-s 70 --merge $OUT/sc.json --out $OUT/sc.json >> $OUT/sc.log 2>&1; grep -A9 "Longest" $OUT/sc.log | tail -9
el sc_8b; timeout $(( 480 - ($(date +%s) - T0) )) python3 benchmarks/smart_checkpointing.py --models llama-3-8b-shape --no-cap --budget-s $(( 420 - ($(date +%s) - T0) )) --merge $OUT/sc.json --out $OUT/sc.json >> $OUT/sc.log 2>&1; grep "llama-3-8b" $OUT/sc.log | head -14; tail -3 $OUT/sc.log
el done
