#!/usr/bin/env bash
# H200 call 5 (session 2026-12-01c): smart_checkpointing under FSDP2 on a CUDA device (torchrun, 1 process, NCCL,
# real pinned-memory offload) against DDP; the plugin's GPU tests after the checkpoint-function change
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
T0=$(date +%s); el() { echo "## $(( $(date +%s) - T0 ))s $*"; }
el pytest; timeout 100 python3 -m pytest -q -p no:warnings tests/test_plugin_smart_checkpointing.py -k "gpu or cuda" > $OUT/gpu_pytest.log 2>&1; tail -2 $OUT/gpu_pytest.log
el fsdp; timeout 200 torchrun --standalone --nproc_per_node 1 tests/distributed/train_arms.py --out $OUT/fsdp2_1gpu.json --steps 6 --arms ddp:baseline,ddp:smart_checkpointing,fsdp2:smart_checkpointing,ddp:fused_ce+padding_free+smart_checkpointing,fsdp2:fused_ce+padding_free+smart_checkpointing > $OUT/fsdp.log 2>&1; tail -2 $OUT/fsdp.log
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/fsdp2_1gpu.json"))
for r in d["runs"]:
    st = r.get("smart_checkpointing_stats") or {}
    print(r["mode"], r["arm"], "ERR " + r["error"][:200] if r["error"] else "", r.get("losses"), r.get("param_sum"),
          r.get("fsdp_sharded"), {k: st.get(k) for k in ("calls", "fsdp_calls", "host_bytes", "offloaded_fraction", "live")})
PY
el done
