#!/usr/bin/env bash
# one H200 call: the remaining arms of issue 8, adamw_8bit re-timed, smart_checkpointing max-seq probes, GPU tests
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > $OUT/pip.log 2>&1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el e2e_a; timeout 200 python3 benchmarks/end_to_end.py --arms unsloth_packing,ours_all_lean,unsloth_default --budget-s 150 --hard-limit-s 195 --out $OUT/e2e_2a.json > $OUT/e2e_2a.log 2>&1; tail -6 $OUT/e2e_2a.log
el adamw; timeout 90 python3 benchmarks/adamw_8bit.py --budget-s 80 --arms fused_adamw,adamw_8bit --out $OUT/adamw_8bit_h200.json > $OUT/adamw.log 2>&1; grep -A4 "^| arm" $OUT/adamw.log
el cap; timeout 110 python3 benchmarks/smart_checkpointing.py --models llama-3.2-1b-shape --cap-only --cap-arms ours,ours_lean --budget-s 100 --merge benchmarks/results/smart_checkpointing_h200.json --out $OUT/smart_checkpointing_h200.json > $OUT/smart_ckpt.log 2>&1; grep "# cap" $OUT/smart_ckpt.log
el e2e_b; R=$(( 535 - ($(date +%s) - T0) )); timeout $R python3 benchmarks/end_to_end.py --arms long_ours_all,long_trl_default,ours_all_full_ft,trl_full_ft --budget-s $(( R - 45 )) --hard-limit-s $(( R - 5 )) --out $OUT/e2e_2b.json > $OUT/e2e_2b.log 2>&1; tail -8 $OUT/e2e_2b.log
el done
