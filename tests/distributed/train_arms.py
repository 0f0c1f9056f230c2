"""Train several plugin arms in one distributed launch and record, per arm and per rank, what happened.

Runs under any launcher that sets the torch.distributed environment (RANK, WORLD_SIZE, MASTER_ADDR...);
on a CPU-only machine accelerate's multi-process launcher is ``--multi_gpu`` too (its ``--cpu`` starts
one process unless given an MPI hostfile), and ``--cpu`` here makes the trainer use CPU and gloo:

    torchrun --standalone --nproc_per_node 2 tests/distributed/train_arms.py --out runs.json --cpu
    accelerate launch --multi_gpu --num_processes 2 tests/distributed/train_arms.py --out runs.json --cpu
    torchrun --standalone --nproc_per_node 2 tests/distributed/train_arms.py --out runs.json \\
        --modes ddp,fsdp2 --arms baseline,fused_ce,fused_ce+padding_free

Each arm is ``<mode>:<plugins joined by +>`` (``baseline`` is no plugin); it builds a fresh model from the
same seed, composes the stack into TRL's unmodified ``SFTTrainer``, trains ``--steps`` steps, undoes the
stack and records:

* ``losses``: the trainer's logged loss per step (already averaged over the ranks by the trainer);
* ``local_losses``: this rank's own loss per step (from ``log_probs``/``label_mask`` of TRL's fused
  head output, whichever head produced it);
* ``param_sum`` / ``param_sq``: checksums of the full trained parameters (FSDP2 shards are gathered);
* ``tokens``: tokens trained on, all ranks (TRL's ``num_tokens``); ``tokens_per_s``: that over the
  time of the steps after the first (warm-up); ``step_s``: per-step wall time;
* ``peak_mem_gb``: peak CUDA memory allocated on this rank (``None`` on CPU);
* ``smart_checkpointing_stats``: the offloader's counters, when that plugin is in the arm.

Rank 0 gathers every rank's records and writes ``--out`` (JSON). Modes: ``ddp`` (the trainer's DDP),
``fsdp2`` (``fsdp="full_shard"``, ``fsdp_config={"fsdp_version": 2}``: accelerate's ``fully_shard``),
``fsdp2_ac`` (FSDP2 with ``fsdp_config["activation_checkpointing"]=True`` and the trainer's own
gradient checkpointing off, as transformers recommends), ``fsdp2_head_unit`` (FSDP2 with every
``nn.Linear`` its own unit, so the ``lm_head`` is a unit that no forward hook unshards when
``fused_ce`` bypasses ``lm_head.forward``).

An arm that raises is recorded with its ``error`` (type, message, traceback) and the next arm runs
(e.g. a plugin's ``PluginError`` refusing a configuration).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist
from gloo_exit import exit_without_finalization  # beside this script

MODES = ("ddp", "fsdp2", "fsdp2_ac", "fsdp2_head_unit")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON file written by rank 0")
    p.add_argument("--modes", default="ddp", help=f"comma-separated, of {MODES}")
    p.add_argument("--arms", default="baseline",
                   help="comma-separated plugin combos joined by '+' ('baseline': none), each run in every mode "
                        "of --modes; 'mode:combo' runs one combo in one mode; a combo ending in '@tied' "
                        "ties the lm_head to the input embeddings (as --tie does for every arm)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="per-device batch size")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--dataset-size", type=int, default=64)
    p.add_argument("--max-words", type=int, default=120, help="length scale of the generated examples")
    p.add_argument("--model", default="tiny", help="an sft_plugins.embedded preset")
    p.add_argument("--tie", action="store_true", help="tie the lm_head to the input embeddings")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--no-grad-ckpt", action="store_true", help="gradient_checkpointing=False (TRL defaults True)")
    p.add_argument("--cpu", action="store_true", help="train on CPU with gloo (the CI setting)")
    p.add_argument("--sc-offload", default=None, help="smart_checkpointing's offload option (\"always\" copies "
                   "the checkpointed inputs through the host pool on CPU too)")
    return p.parse_args()


def _args(opts: argparse.Namespace, mode: str, out_dir: str, model: Any) -> Any:
    from trl import SFTConfig

    kw: dict[str, Any] = dict(
        output_dir=out_dir, max_steps=opts.steps, per_device_train_batch_size=opts.batch, learning_rate=opts.lr,
        max_length=opts.max_length, bf16=opts.bf16, report_to="none", save_strategy="no", logging_steps=1,
        seed=0, dataloader_num_workers=0, gradient_checkpointing=not opts.no_grad_ckpt)
    if opts.cpu:
        kw.update(use_cpu=True, ddp_backend="gloo")
    if mode.startswith("fsdp2"):
        cfg: dict[str, Any] = {"fsdp_version": 2}
        if mode == "fsdp2_ac":
            cfg["activation_checkpointing"] = True
            kw["gradient_checkpointing"] = False
        if mode == "fsdp2_head_unit":  # every nn.Linear its own unit: the lm_head is never unsharded by a hook
            cfg["transformer_layer_cls_to_wrap"] = [*model._no_split_modules, "Linear"]
        kw.update(fsdp="full_shard", fsdp_config=cfg)
    return SFTConfig(**kw)


def _enable_fsdp_on_cpu() -> None:
    """accelerate (1.15) turns a given ``fsdp_plugin`` on only for accelerator devices: on CPU
    (``MULTI_CPU``) the trainer silently trains plain DDP. For the CPU test this applies the same two
    assignments accelerate's ``AcceleratorState.__init__`` makes on GPU (``distributed_type = FSDP``,
    ``fsdp_plugin = ...``), so everything after it (``fsdp2_prepare_model``: ``fully_shard`` of the decoder
    layers, of ``[norm, lm_head]`` and of the root; FSDP2 grad clipping; the optimizer on DTensors) is
    accelerate's and the trainer's own code. Not used on GPU."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_cpu_fsdp_shim", False):
        return

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    init._cpu_fsdp_shim = True  # type: ignore[attr-defined]
    AcceleratorState.__init__ = init  # type: ignore[method-assign]


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if type(p).__name__ == "DTensor" else p


_PATCH_CALLS: list[Any] = []
_KERNEL_WEIGHTS: list[str] = []  # what the fused_ce kernel got as lm_head weight, per call


def _watch_kernel_inputs() -> None:
    """Record the lm_head weight as registered when fused_ce's kernel is reached (a sharded DTensor or the
    unsharded parameter) and what fused_ce hands to the kernel (type and shape)."""
    from sft_plugins.plugins.fused_ce import patch as fused_patch  # our forward calls patch._kernel_inputs

    original = fused_patch._kernel_inputs
    if getattr(original, "_watched", False):
        return

    def watched(model: Any, patch: Any, hidden: Any) -> Any:
        w = model.get_output_embeddings().weight  # as registered when the kernel is reached
        out = original(model, patch, hidden)
        _KERNEL_WEIGHTS.append(f"{type(w).__name__}{tuple(w.shape)}->{type(out[1]).__name__}{tuple(out[1].shape)}")
        return out

    watched._watched = True  # type: ignore[attr-defined]
    fused_patch._kernel_inputs = watched


def _fused_ce_calls() -> dict[str, int] | None:
    return dict(_PATCH_CALLS[-1].calls) if _PATCH_CALLS else None


def _run_arm(opts: argparse.Namespace, mode: str, combo: str, rank: int, out_dir: str) -> dict[str, Any]:
    from transformers import TrainerCallback
    from trl import SFTTrainer

    import sft_plugins
    from sft_plugins.embedded import build_dataset, build_model, build_tokenizer

    plugins, tied = (combo[:-len("@tied")], True) if combo.endswith("@tied") else (combo, opts.tie)
    names = [] if plugins == "baseline" else [n for n in plugins.split("+") if n]
    record: dict[str, Any] = {"mode": mode, "arm": combo, "rank": rank, "error": None}
    tok = build_tokenizer()
    device = "cpu" if opts.cpu or not torch.cuda.is_available() else f"cuda:{torch.cuda.current_device()}"
    overrides = {"tie_word_embeddings": True} if tied else {}
    with torch.device(device):
        model = build_model(opts.model, tokenizer=tok, **overrides)
    local: list[float] = []

    def hook(module: Any, inputs: Any, output: Any) -> None:
        if module.training and getattr(output, "label_mask", None) is not None:
            mask = output.label_mask
            local.append(float(-output.log_probs.detach().sum() / mask.sum().clamp(min=1)))

    handle = model.register_forward_hook(hook)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    args = _args(opts, mode, out_dir, model)
    dataset = build_dataset(opts.dataset_size, max_words=opts.max_words)
    trainer = None
    # accelerate's Accelerator sets ACCELERATE_USE_FSDP=true for good when given an FSDP plugin: every
    # later trainer in this process would then shard too (FSDP1 by default). Arms are independent.
    saved_env = {k: os.environ.get(k) for k in ("ACCELERATE_USE_FSDP",)}
    try:
        options = ({"smart_checkpointing": {"offload": opts.sc_offload}}
                   if opts.sc_offload and "smart_checkpointing" in names else None)
        with sft_plugins.compose(names, options=options) as stack:
            kwargs = stack.prepare(model=model, args=args, train_dataset=dataset, processing_class=tok)
            _PATCH_CALLS.clear()
            _KERNEL_WEIGHTS.clear()
            if "fused_ce" in names:
                from sft_plugins.plugins.fused_ce import patch_of

                _PATCH_CALLS.append(patch_of(model))
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), StepTimer()]
            trainer = SFTTrainer(**kwargs)
            trainer.train()
            if "smart_checkpointing" in names:
                from sft_plugins.plugins.smart_checkpointing import stats

                record["smart_checkpointing_stats"] = stats(model)
    except Exception as exc:  # recorded: a refusal is a result
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()[-4000:]
    finally:
        handle.remove()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if trainer is not None and record["error"] is None:
        logs = trainer.state.log_history
        losses = [log["loss"] for log in logs if "loss" in log]
        tokens = [log["num_tokens"] for log in logs if "num_tokens" in log]
        params = torch.cat([_full(p).detach().flatten().double().cpu() for p in trainer.model.parameters()])
        timed = times[1:] or times
        record.update(
            world_size=trainer.args.world_size, losses=losses, local_losses=local,
            param_sum=float(params.sum()), param_sq=float((params ** 2).sum()),
            distributed_type=str(trainer.accelerator.distributed_type),
            fsdp_sharded=any(type(p).__name__ == "DTensor" for p in trainer.model.parameters()),
            fused_ce_calls=_fused_ce_calls(), kernel_weights=sorted(set(_KERNEL_WEIGHTS)),
            fsdp_enabled=bool(getattr(trainer, "is_fsdp_enabled", False)),
            tokens=tokens[-1] if tokens else None, step_s=times,
            tokens_per_s=((tokens[-1] - tokens[0]) / sum(timed) if len(tokens) > 1 and times[1:] else None),
            peak_mem_gb=(torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None))
    del trainer, model
    return record


def main() -> None:
    opts = _parse()
    modes = [m for m in opts.modes.split(",") if m]
    # "mode:combo" runs that arm in that mode only; a bare combo runs in every --modes mode
    plan = []
    for item in (a for a in opts.arms.split(",") if a):
        mode, _, combo = item.rpartition(":")
        plan += [(mode, combo)] if mode else [(m, combo) for m in modes]
    bad = sorted({m for m, _ in plan} - set(MODES))
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; modes: {MODES}")
    if not dist.is_initialized():
        if torch.cuda.is_available() and not opts.cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("gloo" if opts.cpu or not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if opts.cpu and any(m.startswith("fsdp") for m, _ in plan):
        _enable_fsdp_on_cpu()
    _watch_kernel_inputs()
    out_dir = os.path.join(os.path.dirname(os.path.abspath(opts.out)) or ".", "trainer_out")
    records = []
    for mode, combo in plan:
        t0 = time.perf_counter()
        rec = _run_arm(opts, mode, combo, rank, out_dir)
        rec["arm_wall_s"] = time.perf_counter() - t0
        records.append(rec)
        dist.barrier()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, records)
    if rank == 0:
        meta = {"world_size": world, "torch": torch.__version__, "options": vars(opts),
                "device": (torch.cuda.get_device_name() if torch.cuda.is_available() and not opts.cpu else "cpu")}
        with open(opts.out, "w") as f:
            json.dump({"meta": meta, "runs": [r for per_rank in gathered for r in per_rank]}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_without_finalization()  # the results are on disk by now
