#!/usr/bin/env bash
# H200 call 10 (session 2026-12-01e): a barrier before the one-pass kernel's rescale loop: CUDA tests and the rows probe
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
timeout 100 python3 -m pytest -q -p no:warnings tests/kernels/test_fused_linear_cross_entropy.py tests/test_plugin_fused_ce.py > $OUT/gpu_pytest.log 2>&1; tail -1 $OUT/gpu_pytest.log; grep -E "^E |FAILED" $OUT/gpu_pytest.log | head -5
timeout 90 python3 benchmarks/fused_ce_probe.py --parts rows --out $OUT/fused_ce_probe_rows4_h200.json > $OUT/probe.log 2>&1
python3 - $OUT/fused_ce_probe_rows4_h200.json <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(r["V"], r["softcap"], r["mode"], r["block_v"], r["num_warps"], r["programs_per_sm"], r["ms"], r["GB_per_s"])
PY
