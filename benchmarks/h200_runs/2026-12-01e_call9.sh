#!/usr/bin/env bash
# H200 call 9 (session 2026-12-01e): the end-to-end headline arm (ours, all five plugins) again after fused_ce's one-pass
# row kernel, to compare with set 6's 37,222 real tokens/s (issue 8)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el e2e; timeout 200 python3 benchmarks/end_to_end.py --arms ours_all --budget-s 120 --hard-limit-s 190 --out $OUT/end_to_end_h200_set8.json > $OUT/e2e.log 2>&1; grep -E "^\| (ours|trl|unsloth)" $OUT/e2e.log; tail -3 $OUT/e2e.log | cut -c1-300
el done
