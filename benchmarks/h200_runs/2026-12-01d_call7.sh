#!/usr/bin/env bash
# H200 call 7 (session 2026-12-01d): the end-to-end headline arms again with today's fused_ce row kernel and the
# allocator-statistics short cuts (set 6), to check the issue 8 target still holds with the final code
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el e2e; timeout 330 python3 benchmarks/end_to_end.py --arms ours_all,unsloth_packing,trl_default --budget-s 250 --hard-limit-s 320 --out $OUT/e2e_set6.json > $OUT/e2e.log 2>&1; grep -E "^\| (ours|trl|unsloth)|ours_all vs" $OUT/e2e.log
el done
