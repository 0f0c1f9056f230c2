"""adamw_8bit: the trainer's optimizer becomes bitsandbytes' 8-bit AdamW.

The plugin answers only ``optimizer_cls_and_kwargs=``: the unmodified ``Trainer.create_optimizer``
still builds the parameter groups (trainable parameters only; decay vs no-decay by its own
``get_decay_parameter_names``) and hands them to our class, so the grouping is Trainer's by
construction rather than re-implemented here. The kwargs carry the args' learning rate, betas, eps and
weight decay.

Embedding and lm_head parameters keep 32-bit state (what HF does for ``nn.Embedding`` when
``optim="adamw_bnb_8bit"``): their rows are updated sparsely and 8-bit blockwise quantisation of rare
tokens' moments hurts. HF does it through bitsandbytes' ``GlobalOptimManager``, a process-global
singleton keyed by ``id(param)`` that is never cleared; ids are recycled after garbage collection, so
an override could leak into the next ablation arm's model. We give the same override per optimizer
instance instead (``get_config`` of a thin subclass), which leaves no process-global state behind:
``undo()`` has nothing to restore, and a user's own ``GlobalOptimManager`` overrides still win.

Refusals (``sft_check``, each naming the fix): bitsandbytes missing or unable to step on the training
device (probed), ``args.optim`` naming another optimizer, ``optim_args``/``optim_target_modules``,
DeepSpeed, FSDP, ``paged`` off CUDA. ``optimizers=``/``optimizer_cls_and_kwargs=`` given by the user are
refused by the core whenever a plugin supplies the optimizer.

The step (non-paged, CUDA) calls the kernels directly instead of through bitsandbytes' per-parameter
Python (a device sync and ~100 us of host work per tensor); the 8-bit updates run in our Triton kernel
(``sft_plugins.kernels.adam8bit_blockwise_step_grouped_``: bitsandbytes' state format and CUDA arithmetic,
twice its speed; all of a step's 8-bit tensors in one launch),
``kernel="bitsandbytes"`` keeps its own. Paged and CPU optimizers step exactly as bitsandbytes does.

torch, transformers and bitsandbytes are imported inside functions only: listing plugins stays cheap.
"""

from __future__ import annotations

from typing import Any

from ..._markers import hookimpl
from ..._options import Option
from ..shared import fsdp_requested

# args.optim values the plugin may stand in for: the AdamW defaults (transformers picks
# adamw_torch_fused on torch >= 2.8, adamw_torch before) and HF's own bitsandbytes 8-bit AdamW names,
# which ask for exactly what this plugin supplies. Anything else would be silently ignored by Trainer
# once optimizer_cls_and_kwargs is set, so it is refused.
_COMPATIBLE_OPTIM = {"adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "adamw_8bit"}
_PAGED_OPTIM = {"paged_adamw_8bit"}
OPTIONS = [
    Option("paged", False, "PagedAdamW8bit: state in CUDA unified memory, evicted to host under pressure", type=bool),
    Option("fp32_embeddings", True, "32-bit state for nn.Embedding and lm_head parameters, as HF does", type=bool),
    Option("min_8bit_size", 4096, "tensors smaller than this keep 32-bit state (bitsandbytes' default)", type=int,
           minimum=1),
    Option("kernel", "triton", "8-bit updates on CUDA: 'triton' (ours, same state format, ~2x faster) or "
           "'bitsandbytes' (its compiled kernel); CPU always uses bitsandbytes", choices=("triton", "bitsandbytes")),
]


def state_bytes(optimizer: Any) -> dict[str, Any]:
    """Optimizer state memory measured from the state tensors (see :func:`.optimizer.state_bytes`)."""
    from .optimizer import state_bytes as measure

    return measure(optimizer)


@hookimpl
def sft_options() -> list[Option]:
    return OPTIONS


@hookimpl
def sft_describe(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": "bitsandbytes 8-bit AdamW (paged optional) as the trainer's optimizer: ~2 bytes of state "
                   "per parameter instead of 8; embeddings and lm_head keep 32-bit state",
        # 8-bit moments change the updates, so per-step losses drift from fp32 AdamW by design;
        # parity is measured as convergence (tests: final loss within 2% after 200 steps).
        "loss_parity": None,
        "quantized": "steps only what trains (LoRA adapters); the frozen 4-/8-bit base has no optimizer state",
    }


@hookimpl
def sft_check(args: Any, options: dict[str, Any]) -> list[str]:
    from .optimizer import optim_name, probe, target_device

    errors: list[str] = []
    opts = options
    if args is None:
        return ["adamw_8bit reads the learning rate, betas, eps and weight decay from the training arguments: "
                "pass args=SFTConfig(...) or args=TrainingArguments(...) to prepare()"]
    optim = optim_name(args)
    if optim in _PAGED_OPTIM and not opts["paged"]:
        errors.append(f"args.optim={optim!r} asks for paged state: compose with "
                      "options={'adamw_8bit': {'paged': True}}, or leave optim at its default")
    elif optim not in _COMPATIBLE_OPTIM | _PAGED_OPTIM:
        errors.append(f"args.optim={optim!r} asks for another optimizer, which adamw_8bit would replace: "
                      "leave optim at its default (adamw_torch_fused) or drop the adamw_8bit plugin")
    if getattr(args, "optim_args", None):
        errors.append(f"args.optim_args={args.optim_args!r} would be ignored by adamw_8bit: unset it")
    if getattr(args, "optim_target_modules", None):
        errors.append("args.optim_target_modules (GaLore/APOLLO) does not apply to adamw_8bit: unset it")
    if getattr(args, "deepspeed", None):
        errors.append("DeepSpeed builds or wraps its own optimizer: use its optimizer config instead of "
                      "adamw_8bit, or drop args.deepspeed")
    fsdp = fsdp_requested(args)  # args.fsdp, or accelerate's environment (`accelerate launch --use_fsdp`)
    if fsdp:
        where = "args.fsdp" if fsdp == "args" else "FSDP in the accelerate config / ACCELERATE_USE_FSDP"
        errors.append(f"adamw_8bit is not verified with FSDP (sharded DTensor parameters, sharded 8-bit state): "
                      f"drop {where}, or the plugin")
    problem = probe(target_device(args), opts["paged"])
    if problem:
        errors.append(problem)
    return errors


@hookimpl
def sft_optimizer_cls_and_kwargs(model: Any, args: Any, options: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    from .optimizer import embedding_parameters, optimizer_classes

    opts = options
    cls = optimizer_classes()[bool(opts["paged"])]
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        # Trainer sets weight_decay on each group (args.weight_decay or 0.0 for bias/norm); this
        # default only matters for a group without it, and must not be bitsandbytes' 1e-2.
        "weight_decay": args.weight_decay,
        "min_8bit_size": int(opts["min_8bit_size"]),
        "fp32_params": embedding_parameters(model) if opts["fp32_embeddings"] else [],
        "kernel": opts["kernel"],
    }
    return cls, kwargs


@hookimpl
def sft_callbacks(args: Any, options: dict[str, Any]) -> list[Any]:
    if not options["fp32_embeddings"]:
        return []
    from .callbacks import AdamW8bitEmbeddingsCallback

    return [AdamW8bitEmbeddingsCallback()]


