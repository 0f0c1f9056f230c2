"""DDP on CPU: two gloo processes under torchrun train with the parity plugins composed, and agree."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import warnings

import pytest

import sft_plugins

SCRIPT = pathlib.Path(__file__).parent / "distributed" / "ddp_train.py"


def _parity_plugins() -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = sft_plugins.available()
    return [n for n, i in found.items() if i.ok and i.source == "builtin" and i.loss_parity is not None]


@pytest.mark.parametrize("combo, lora", [("", False), ("+".join(_parity_plugins()), False),
                                         ("+".join(_parity_plugins()), True)],
                         ids=["baseline", "parity-plugins", "parity-plugins-lora"])
def test_ddp_ranks_agree(tmp_path, combo, lora):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), str(tmp_path), combo] + (["lora"] if lora else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert len(ranks[0]["losses"]) == 4
    # DDP averages gradients, so both ranks hold the same weights after every step
    assert ranks[0]["param_sum"] == pytest.approx(ranks[1]["param_sum"], rel=1e-6)
    assert ranks[0]["param_sq"] == pytest.approx(ranks[1]["param_sq"], rel=1e-6)
    if lora and "fused_lora" in combo:  # on every rank each of the 14 LoRA projections ran fused
        assert [r["fused_lora_layers"] for r in ranks] == [14, 14]
