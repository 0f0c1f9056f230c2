#!/usr/bin/env bash
# H200 call 8 (session 2026-12-01d): is 20 steps (6 untimed) enough for Unsloth? Its per-step times kept varying
# (0.80-1.81 s in set 6) -> Unsloth packing and ours all five over 60 steps, the first 20 untimed (set 7)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el e2e; timeout 400 python3 benchmarks/end_to_end.py --arms unsloth_packing,ours_all --steps 60 --warmup 20 --arm-timeout 260 --budget-s 330 --hard-limit-s 395 --out $OUT/e2e_set7.json > $OUT/e2e.log 2>&1; grep -E "^\| (ours|trl|unsloth)|ours_all vs" $OUT/e2e.log
el done
