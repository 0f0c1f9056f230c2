#!/usr/bin/env bash
# H200 call 6 (session 2026-12-01c): smart_checkpointing's 8B rows with today's defaults (lean recompute) next to HF
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
timeout 265 python3 benchmarks/smart_checkpointing.py --models llama-3-8b-shape --arms hf,ours --no-cap --budget-s 235 --out $OUT/sc_8b_lean.json > $OUT/sc.log 2>&1; grep -E "^\| (llama|ours|hf)" $OUT/sc.log | head -12; tail -3 $OUT/sc.log
