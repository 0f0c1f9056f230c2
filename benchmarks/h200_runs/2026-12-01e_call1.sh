#!/usr/bin/env bash
# H200 call 1 (session 2026-12-01e): CUDA tests of the one-pass row kernel and the Triton dW GEMM; the dW probe
# (cuBLAS addmm_ vs Triton configs per head); fused_ce benchmark with the one-pass default, the two-pass arm and
# the Triton dW arm (best probe config)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el pytest; timeout 100 python3 -m pytest -q -x -p no:warnings tests/kernels/test_fused_linear_cross_entropy.py tests/test_plugin_fused_ce.py > $OUT/gpu_pytest.log 2>&1; tail -3 $OUT/gpu_pytest.log
el probe; timeout 150 python3 benchmarks/fused_ce_probe.py --parts dw --out $OUT/fused_ce_dw_probe_h200.json > $OUT/probe.log 2>&1
python3 - $OUT/fused_ce_dw_probe_h200.json <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d.get("dw", []):
    t = {k: v.get("ms") for k, v in r["triton"].items()}
    print(r["shape"], "K", r["K"], "logits", round(r["logits_gemm_ms"], 3), "cublas", round(r["cublas_addmm_ms"], 3),
          "best", r["best_triton"], t.get(r["best_triton"]), "err c/t", r["cublas_rel_err"], r["triton"].get(r["best_triton"], {}).get("rel_err"))
    print("   ", {k: (round(v, 3) if v else None) for k, v in t.items()})
print("overall", d.get("dw_best_overall"))
PY
tail -3 $OUT/probe.log | cut -c1-300
export SFT_PLUGINS_CE_DW_CONFIG=$(python3 -c "import json;print(json.load(open('$OUT/fused_ce_dw_probe_h200.json')).get('dw_best_overall') or '128,128,64,8,4,4,1')")
echo "dw config $SFT_PLUGINS_CE_DW_CONFIG"
el bench; timeout 300 python3 benchmarks/fused_ce.py --iters 20 --methods gemm_floor,gemm_floor_valid,ours,ours_stats,ours_two_pass,ours_dw_triton,eager,trl_head,trl_head_metrics,liger,cce --out $OUT > $OUT/bench.log 2>&1; grep -E "^\| (llama|qwen|gemma)" $OUT/bench.log | head -40
el done
