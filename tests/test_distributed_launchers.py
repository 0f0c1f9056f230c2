"""The stack under `accelerate launch` and under FSDP2, on CPU: two gloo processes each.

One torchrun launch trains every FSDP2 arm and its DDP reference (``tests/distributed/train_arms.py``),
one ``accelerate launch`` trains the baseline and the parity plugins; the tests read their JSON.
FSDP2 on CPU: accelerate 1.15 enables a given ``fsdp_plugin`` only on accelerator devices, so the
script applies accelerate's own two-line switch on CPU (see ``_enable_fsdp_on_cpu`` there); the rest
(``fully_shard`` of layers, ``[norm, lm_head]`` and root, the optimizer on DTensors) is accelerate's
and the trainer's code. The launched processes run the kernels' torch path (no ``TRITON_INTERPRET``:
the interpreter costs ~8 s per arm here); the kernel backends' parity is tested in
``tests/plugins/fused_ce`` and ``tests/kernels``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import sft_plugins

SCRIPT = pathlib.Path(__file__).parent / "distributed" / "train_arms.py"
STEPS = 4
FSDP_ARMS = ["fsdp2:baseline", "fsdp2:fused_ce", "fsdp2:fused_ce+padding_free", "fsdp2:fused_ce@tied",
             "fsdp2_head_unit:fused_ce", "fsdp2_ac:fused_ce", "fsdp2:smart_checkpointing",
             "fsdp2:fused_ce+padding_free+smart_checkpointing"]
DDP_ARMS = ["ddp:baseline", "ddp:fused_ce", "ddp:fused_ce+padding_free", "ddp:fused_ce@tied",
            "ddp:smart_checkpointing", "ddp:fused_ce+padding_free+smart_checkpointing"]


def _parity_plugins() -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = sft_plugins.available()
    return [n for n, i in found.items() if i.ok and i.source == "builtin" and i.loss_parity is not None]


def _tolerance(combo: str) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = sft_plugins.available()
    return max([found[n].loss_parity for n in combo.split("+") if n in found] or [0.0])


PARITY = "+".join(_parity_plugins())


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pathlib.Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    return env


def _launch(cmd: list[str], out: pathlib.Path) -> dict[tuple[str, str], list[dict]]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in data["runs"]:
        runs.setdefault((r["mode"], r["arm"]), []).append(r)
    for key, per_rank in runs.items():
        assert sorted(r["rank"] for r in per_rank) == [0, 1], key
        for r in per_rank:
            assert r["error"] is None, f"{key} rank {r['rank']}: {r.get('traceback')}"
    print(f"\n{' '.join(cmd[:6])} ...")  # the figures, for docs/distributed.md (pytest -s)
    for (mode, arm), per_rank in runs.items():
        r = per_rank[0]
        print(f"  {mode:16} {arm:45} loss/step {[round(x, 6) for x in r['losses']]}  "
              f"param_sum {r['param_sum']:.9f}  rank-local losses "
              f"{[[round(x, 4) for x in q['local_losses']] for q in sorted(per_rank, key=lambda q: q['rank'])]}"
              f"  head at kernel {r['kernel_weights'] or '-'}")
    return runs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script_args(out: pathlib.Path, arms: list[str]) -> list[str]:
    # smart_checkpointing copies every checkpointed input through its host pool, as it does on a GPU
    return [str(SCRIPT), "--out", str(out), "--cpu", "--steps", str(STEPS), "--arms", ",".join(arms),
            "--sc-offload", "always"]


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun") / "runs.json"
    arms = [*DDP_ARMS, *FSDP_ARMS]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_script_args(out, arms)]
    return _launch(cmd, out)


@pytest.fixture(scope="module")
def accelerate_runs(tmp_path_factory):
    accelerate = shutil.which("accelerate") or str(pathlib.Path(sys.executable).parent / "accelerate")
    if not os.path.exists(accelerate):
        pytest.skip("the accelerate CLI is not installed")
    out = tmp_path_factory.mktemp("accelerate") / "runs.json"
    # `--cpu` alone starts ONE process (accelerate's multi-CPU launch goes through mpirun); the
    # multi-process launcher is `--multi_gpu`, which is torch's elastic launcher: with the trainer's
    # use_cpu=True and ddp_backend="gloo" it trains on CPU
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           *_script_args(out, ["ddp:baseline", f"ddp:{PARITY}"])]
    return _launch(cmd, out)


def _assert_ranks_agree(per_rank: list[dict]) -> None:
    r0, r1 = sorted(per_rank, key=lambda r: r["rank"])
    assert r0["world_size"] == r1["world_size"] == 2
    assert len(r0["losses"]) == STEPS
    assert r0["losses"] == r1["losses"]  # the trainer logs the mean over ranks
    assert r0["param_sum"] == pytest.approx(r1["param_sum"], rel=1e-6)
    assert r0["param_sq"] == pytest.approx(r1["param_sq"], rel=1e-6)
    # the ranks trained on different halves of each global batch
    assert r0["local_losses"] != r1["local_losses"]


@pytest.mark.parametrize("combo", ["baseline", PARITY])
def test_accelerate_launch_ranks_agree(accelerate_runs, combo):
    _assert_ranks_agree(accelerate_runs[("ddp", combo)])


def test_accelerate_launch_matches_torchrun(accelerate_runs, torchrun_runs):
    """Same script, same args: accelerate's launcher and torchrun train the same baseline; the parity
    plugins stay within their declared loss tolerance of it."""
    acc, tr = accelerate_runs[("ddp", "baseline")][0], torchrun_runs[("ddp", "baseline")][0]
    assert acc["losses"] == pytest.approx(tr["losses"], rel=1e-6)
    assert acc["param_sum"] == pytest.approx(tr["param_sum"], rel=1e-6)
    parity = accelerate_runs[("ddp", PARITY)][0]
    assert parity["losses"] == pytest.approx(acc["losses"], rel=_tolerance(PARITY))


def _ddp_rank(runs: dict, combo: str, rank: int) -> dict:
    return next(r for r in runs[("ddp", combo)] if r["rank"] == rank)


@pytest.mark.parametrize("arm", FSDP_ARMS)
def test_fsdp2_matches_ddp(torchrun_runs, arm):
    """FSDP2 (accelerate's fully_shard through SFTConfig(fsdp=..., fsdp_config={"fsdp_version": 2}))
    trains what DDP trains: same logged loss per step (1e-4, fp32) and the same gathered weights."""
    mode, combo = arm.split(":")
    fsdp = torchrun_runs[(mode, combo)]
    ddp = torchrun_runs[("ddp", combo)][0]
    _assert_ranks_agree(fsdp)
    for r in fsdp:
        assert r["fsdp_enabled"] and r["fsdp_sharded"], "the trained model is not FSDP2-sharded"
        assert r["losses"] == pytest.approx(ddp["losses"], rel=1e-4)
        assert r["local_losses"] == pytest.approx(_ddp_rank(torchrun_runs, combo, r["rank"])["local_losses"], rel=1e-4)
        assert r["param_sum"] == pytest.approx(ddp["param_sum"], rel=1e-6)
        assert r["param_sq"] == pytest.approx(ddp["param_sq"], rel=1e-6)
        if "fused_ce" in combo:
            assert r["fused_ce_calls"] == {"fused_lm_head": STEPS}
            # accelerate's [norm, lm_head] unit ([norm, embed, lm_head] when tied) is unsharded by a
            # pre-forward hook inside the backbone; a head that is a unit of its own reaches the kernel
            # sharded and fused_ce unshards it through FSDP
            first = "DTensor" if mode == "fsdp2_head_unit" else "Parameter"
            assert r["kernel_weights"] == [f"{first}(512, 64)->Parameter(512, 64)"]


@pytest.mark.parametrize("combo", ["smart_checkpointing", "fused_ce+padding_free+smart_checkpointing"])
def test_smart_checkpointing_offloads_per_rank_under_fsdp2(torchrun_runs, combo):
    """Under FSDP2 every layer's recompute runs on the unsharded parameters FSDP swaps in and accumulates
    into their gradients (which FSDP reduce-scatters); under DDP the parameters are the function's inputs.
    Each rank offloads its own inputs (host pool, as on a GPU); the trained weights match DDP's
    (test_fsdp2_matches_ddp)."""
    for mode in ("ddp", "fsdp2"):
        for r in torchrun_runs[(mode, combo)]:
            st = r["smart_checkpointing_stats"]
            assert st["calls"] == STEPS * 2 and st["plain_calls"] == 0  # the tiny model's 2 layers, every step
            assert st["fsdp_calls"] == (st["calls"] if mode == "fsdp2" else 0)
            assert st["host_bytes"] > 0 and st["live"] == 0


def _fsdp_args(tmp_path, **kw):
    from trl import SFTConfig

    kw.setdefault("fsdp_config", {"fsdp_version": 2})
    return SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", fsdp="full_shard", **kw)


@pytest.mark.parametrize("plugin, by_args, by_env, env", [
    ("smart_checkpointing", "FSDP's own activation checkpointing.*drop one",
     "FSDP's own activation checkpointing.*drop one", {"FSDP_ACTIVATION_CHECKPOINTING": "true"}),
    ("adamw_8bit", "FSDP.*drop args.fsdp", "FSDP.*ACCELERATE_USE_FSDP", {}),
])
def test_plugins_refuse_fsdp(tmp_path, monkeypatch, plugin, by_args, by_env, env):
    """adamw_8bit refuses FSDP; smart_checkpointing refuses FSDP's own activation checkpointing on top of its
    own (by args or by accelerate's environment)."""
    if plugin == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
    from trl import SFTConfig

    from sft_plugins.embedded import build_model, build_tokenizer

    model = build_model(tokenizer=build_tokenizer())
    args = (_fsdp_args(tmp_path, fsdp_config={"fsdp_version": 2, "activation_checkpointing": True})
            if plugin == "smart_checkpointing" else _fsdp_args(tmp_path))
    with pytest.raises(sft_plugins.PluginError, match=by_args):
        sft_plugins.compose([plugin]).prepare(model=model, args=args)
    # FSDP turned on by `accelerate launch --use_fsdp` (environment), args.fsdp unset
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(sft_plugins.PluginError, match=by_env):
        sft_plugins.compose([plugin]).prepare(model=model, args=args)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_fsdp2_matches_ddp_cuda(tmp_path):
    """The same FSDP2-vs-DDP parity on 2 GPUs (NCCL, fp32, the Triton kernel)."""
    out = tmp_path / "runs.json"
    arms = [*DDP_ARMS, *FSDP_ARMS]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), "--out", str(out), "--steps", str(STEPS), "--arms", ",".join(arms)]
    runs = _launch(cmd, out)
    for arm in FSDP_ARMS:
        mode, combo = arm.split(":")
        ddp = runs[("ddp", combo)][0]
        for r in runs[(mode, combo)]:
            assert r["fsdp_sharded"]
            assert r["losses"] == pytest.approx(ddp["losses"], rel=1e-4)
            assert r["param_sum"] == pytest.approx(ddp["param_sum"], rel=1e-5)
