#!/usr/bin/env bash
# H200 call 1 (session 2026-12-01b): ablate on the 1B shape (issue 7), adamw_8bit direct kernels + profile
# (issue 6), ours_all memory at its peak (issue 8), GPU tests of the new code, smart_checkpointing cap probe
# with mlp_chunks="auto" (issue 4)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > $OUT/pip.log 2>&1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el pytest; timeout 90 python3 -m pytest -q -k "cuda or gpu or auto or equals_bitsandbytes" tests/test_plugin_smart_checkpointing.py tests/test_plugin_adamw_8bit.py > $OUT/gpu_pytest.log 2>&1; tail -3 $OUT/gpu_pytest.log
el adamw; timeout 130 python3 benchmarks/adamw_8bit.py --budget-s 120 --arms fused_adamw,adamw_8bit,hf_bnb_8bit --profile --out $OUT/adamw_8bit_h200.json > $OUT/adamw.log 2>&1; tail -25 $OUT/adamw.log | head -8
el mem; timeout 75 python3 benchmarks/end_to_end.py --arms ours_all --memory-snapshot ours_all --budget-s 10 --hard-limit-s 72 --out $OUT/e2e_mem.json > $OUT/e2e_mem.log 2>&1; grep "^| ours" $OUT/e2e_mem.log
el ablate; timeout 250 sft-plugins ablate --model llama-3.2-1b-shape --lora --all --steps 30 --batch-size 8 --max-length 1024 --dataset-size 2048 --output-dir $OUT/ablate > $OUT/ablate.log 2>&1; echo "rc=$?"; tail -22 $OUT/ablate.log
el cap; timeout $(( 585 - ($(date +%s) - T0) )) python3 benchmarks/smart_checkpointing.py --models llama-3.2-1b-shape --cap-only --cap-arms ours --budget-s 100 --out $OUT/sc_cap_auto.json > $OUT/sc_cap.log 2>&1; tail -12 $OUT/sc_cap.log
el done
