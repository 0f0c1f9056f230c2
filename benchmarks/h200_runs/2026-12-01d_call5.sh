#!/usr/bin/env bash
# H200 call 5 (session 2026-12-01d): where the fused_ce step's time goes between kernels (GPU idle gaps, host cost
# of the memory queries) on the two shapes that miss -> benchmarks/results/fused_ce_probe_gaps_h200.json
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
export PYTHONUNBUFFERED=1
timeout 200 python3 benchmarks/fused_ce_probe.py --parts gaps --out $OUT/fused_ce_probe_gaps_h200.json 2>&1 | tail -5
