#!/usr/bin/env bash
# Prepared, NOT yet run (session 2026-12-01d's device time was spent): settle the three fused_ce rows whose verdict
# flipped between runs 5 and 6 (llama3.2-1b frozen/trainable vs the floor, qwen2.5-7b trainable vs CCE) with 40 timed
# steps a method instead of 16-20, and re-run gemma2-2b with the profile. ~3.5 min. Copy $OUT/fused_ce.json to
# benchmarks/results/fused_ce_run7.json and report it next to run 6 (do not overwrite run 6: it has all 8 rows).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el bench; timeout 330 python3 benchmarks/fused_ce.py --shapes llama3.2-1b,qwen2.5-7b,gemma2-2b --iters 40 --profile --out $OUT > $OUT/bench.log 2>&1; grep -E "^\| (llama|qwen|gemma)" $OUT/bench.log | head -6
el done
