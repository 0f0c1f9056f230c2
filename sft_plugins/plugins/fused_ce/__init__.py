"""fused_ce: the training loss goes through ``sft_plugins.kernels``' fused linear + cross-entropy head.

How it takes over, without touching either trainer's code:

* ``sft_patch_model`` installs one forward on the *base* model instance (under any PEFT wrappers;
  PEFT's ``LoraModel.forward`` calls ``self.model.forward``, i.e. this instance attribute). In
  training mode it serves

  - ``model(..., labels=..., num_items_in_batch=...)`` (``transformers.Trainer``): backbone, then the
    kernel on the shifted hidden states with HF's ``ForCausalLMLoss`` normalisation (sum over valid
    tokens / ``num_items_in_batch``, or the mean); the logits are never built (``logits=None``);
  - ``model(..., fused_lm_head=True)`` (TRL ``SFTTrainer.compute_loss``): the same, returning TRL's
    ``FusedCausalLMOutput`` with ``log_probs`` (with grad), ``entropy``, ``is_top1`` and
    ``label_mask`` from the kernel's stats pass, so TRL's loss code, its ``entropy`` and its
    ``mean_token_accuracy`` metrics run unmodified on our numbers.

  Everything else (eval mode, generation, no labels, ``logits_to_keep``) goes to the forward that
  would have run without the plugin.
* ``SFTTrainer.__init__`` calls ``add_fused_lm_head`` (imported by name into
  ``trl.trainer.sft_trainer``), which would replace our forward with TRL's. While a model is
  patched, that name points to an interceptor: for *our* models it lets TRL install its head (so
  TRL's forward exists as the eval/generation delegate, exactly as in the baseline), then puts our
  forward back in front of it; other models go straight to TRL. A guard callback re-checks at
  ``on_train_begin`` (catching a trainer that installed TRL's head some other way) and refuses to
  train if something else replaced the forward.
* ``undo()`` leaves the model as the baseline would be at that point: TRL's head if TRL asked for
  one, otherwise the model's forward as before; the TRL module name is restored once no model is
  patched.

torch / transformers / trl / peft are imported inside functions only.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any, Callable

from ..._markers import hookimpl
from ..._options import Option
from . import lm_head as _lm_head

OPTIONS = [
    Option("backend", "auto", "kernel backend: auto (Triton on CUDA or under TRITON_INTERPRET=1, else the "
           "chunked torch path), triton, torch", choices=("auto", "triton", "torch")),
    Option("lm_head_lora", "train", "a LoRA adapter on lm_head: 'train' it through the kernel, or 'refuse'",
           choices=("train", "refuse")),
    Option("extra_model_types", [], "model_types you vouch for (plain lm_head, config scale/softcap only)",
           type=(list, tuple),
           check=lambda v: None if all(isinstance(t, str) for t in v)
           else f"option 'extra_model_types' must be a list of model_type strings, got {v!r}"),
    Option("downcast_frozen_embeddings", True, "under bf16/fp16 training, frozen fp32 input/output embeddings "
           "whose values are exact in that dtype (peft's prepare_model_for_kbit_training upcast) are stored in it "
           "again at train begin; the lookup is cast back to fp32, so every number is unchanged", type=bool),
]


def patch_of(model: Any) -> Any:
    """The live patch of ``model`` (or of its base under PEFT), for tests and debugging."""
    from .patch import patch_of_base

    return patch_of_base(_lm_head.base_of(model))


def _zero3_enabled() -> bool:
    if "deepspeed" not in sys.modules:
        return False
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


@hookimpl
def sft_options() -> list[Option]:
    return OPTIONS


@hookimpl
def sft_describe(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": "training loss through a fused linear + cross-entropy kernel (no N x V logits), "
                   "in SFTTrainer (taking over TRL's fused head, keeping its metrics) and Trainer",
        "loss_parity": 1e-3,
        "quantized": "as on bf16 (transformers keeps the head unquantised); a frozen 4-bit head is dequantised "
                     "by bitsandbytes per step; an 8-bit head is refused",
    }


@hookimpl
def sft_check(args: Any, model: Any, options: dict[str, Any]) -> list[str]:
    if model is None or isinstance(model, str):
        return ["fused_ce patches the model: load it and pass model=<PreTrainedModel instance> to prepare()"]
    base = _lm_head.base_of(model)
    errors = _lm_head.model_errors(base, set(options["extra_model_types"]))
    if not errors and options["lm_head_lora"] == "refuse":
        try:
            _lm_head.resolve_head(base.get_output_embeddings(), lora="refuse")
        except _lm_head.UnsupportedHead as exc:
            errors.append(str(exc))
    if patch_of(base) is not None:
        errors.append("this model is already patched by another fused_ce stack: undo() that stack first")
    if args is not None:
        if getattr(args, "label_smoothing_factor", 0.0):
            errors.append("label_smoothing_factor > 0 makes the trainer compute the loss from the full logits "
                          "(its label smoother), bypassing fused_ce: set label_smoothing_factor=0 or drop fused_ce")
        if _zero3_enabled():
            errors.append("DeepSpeed ZeRO-3 partitions lm_head.weight, which the kernel reads directly (and "
                          "re-reads in backward): use ZeRO-2 or FSDP, or drop fused_ce")
        is_trl = type(args).__module__.startswith("trl.")
        liger_flce = (getattr(args, "liger_kernel_config", None) or {}).get("fused_linear_cross_entropy", True)
        if getattr(args, "use_liger_kernel", False) and not is_trl and liger_flce:
            errors.append("use_liger_kernel=True replaces the model's forward with Liger's fused CE at train "
                          "start: set liger_kernel_config={'fused_linear_cross_entropy': False} or drop one")
    return errors


@hookimpl
def sft_patch_model(model: Any, args: Any, options: dict[str, Any], state: SimpleNamespace) -> Callable[[], None]:
    from .patch import apply_patch

    if args is not None and type(args).__module__.startswith("trl."):
        import trl.trainer.sft_trainer  # noqa: F401  (SFTConfig given: SFTTrainer will follow)
    state.patch, undo_patch = apply_patch(_lm_head.base_of(model), options)

    def undo() -> None:
        from .frozen_embeddings import restore

        restore(state)
        undo_patch()

    return undo


@hookimpl
def sft_callbacks(options: dict[str, Any], state: SimpleNamespace) -> list[Any]:
    patch = getattr(state, "patch", None)
    if patch is None or not patch.active:
        return []
    from .guard import FusedCEGuard

    callbacks = [FusedCEGuard(patch)]
    if options["downcast_frozen_embeddings"]:
        from .frozen_embeddings import make_callback

        callbacks.append(make_callback(state))
    return callbacks
