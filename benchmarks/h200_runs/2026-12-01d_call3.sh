#!/usr/bin/env bash
# H200 call 3 (session 2026-12-01d): fused_ce row-kernel probe (block/warps x pass-2 order x L2 hints) and
# step times with the new tanh default candidates -> benchmarks/results/fused_ce_probe_rows_h200.json
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el probe; timeout 300 python3 benchmarks/fused_ce_probe.py --parts rows --out $OUT/fused_ce_probe_rows_h200.json > $OUT/probe.log 2>&1; tail -2 $OUT/probe.log
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/fused_ce_probe_rows_h200.json"))
for r in sorted(d["rows"], key=lambda r: (r["softcap"] or 0, r["ms"])): print(r["softcap"], r["block_v"], r["num_warps"], int(r["reverse"]), int(r["l2_hints"]), r["ms"], r["GB_per_s"])
PY
el done
