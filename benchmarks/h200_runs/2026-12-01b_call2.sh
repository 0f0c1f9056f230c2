#!/usr/bin/env bash
# H200 call 2 (session 2026-12-01b): GPU tests of the Triton 8-bit AdamW kernel and of mlp_chunks="auto";
# adamw_8bit bench with the kernel (issue 6); the default ablation on the 1B shape (issue 7); fused_ce rerun (issue 3)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > $OUT/pip.log 2>&1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el pytest; timeout 100 python3 -m pytest -q tests/kernels/test_adam8bit_blockwise.py tests/test_plugin_adamw_8bit.py tests/test_plugin_smart_checkpointing.py -k "cuda or gpu or auto or equals_bitsandbytes or kernel or reference" > $OUT/gpu_pytest.log 2>&1; tail -4 $OUT/gpu_pytest.log
el adamw; timeout 110 python3 benchmarks/adamw_8bit.py --budget-s 100 --arms fused_adamw,adamw_8bit --profile --out $OUT/adamw_8bit_h200.json > $OUT/adamw.log 2>&1; grep -A4 "^| arm" $OUT/adamw.log
el ablate; timeout 260 sft-plugins ablate --model llama-3.2-1b-shape --lora --steps 30 --batch-size 8 --max-length 1024 --dataset-size 2048 --output-dir $OUT/ablate > $OUT/ablate.log 2>&1; echo "rc=$?"; tail -14 $OUT/ablate.log
cp $OUT/ablate/results.json $OUT/ablate_results.json 2>/dev/null; rm -rf $OUT/ablate/arms
el fused_ce; timeout $(( 570 - ($(date +%s) - T0) )) python3 benchmarks/fused_ce.py --tune --iters 8 --profile --out $OUT > $OUT/fused_ce.log 2>&1; tail -16 $OUT/fused_ce.log
el done
