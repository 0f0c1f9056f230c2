#!/usr/bin/env bash
# H200 call 5 (session 2026-12-01b): the GPU tests of the 8-bit AdamW kernel and plugin after the last tolerance fix
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site || exit
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1
timeout 100 python3 -m pytest -q -p no:warnings tests/kernels/test_adam8bit_blockwise.py tests/test_plugin_adamw_8bit.py tests/test_plugin_smart_checkpointing.py -k "cuda or gpu or auto or equals_bitsandbytes or kernel or reference" > $OUT/gpu_pytest.log 2>&1; tail -4 $OUT/gpu_pytest.log
