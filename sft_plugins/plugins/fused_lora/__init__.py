"""fused_lora: PEFT's LoRA linear layers run as one fused autograd function each (``function.py``).

PEFT's forward casts each adapter's input to the adapter dtype, runs two small matmuls, scales and adds
the result to the base output: activation-sized elementwise passes and copies around every projection,
in the forward, the recompute and the backward. The fused function uses the input as it comes, adds
``s (x A^T) B^T`` into the base output in place with one ``addmm`` and keeps only the input and the
rank-r products for its backward. A layer that is not plain LoRA at call time (DoRA or another variant,
dropout > 0, a LoRA bias, adapters merged or disabled, a base layer other than ``nn.Linear`` or a
frozen 4-bit ``Linear4bit``) runs PEFT's own forward.

How it plugs in: ``SFTTrainer(peft_config=…)`` wraps the model after ``prepare()``, so the LoRA layers
exist only once the trainer is built. The plugin therefore patches at ``prepare()`` (a model the user
wrapped with peft) and again from a callback at ``on_train_begin``, setting an instance ``forward`` on
each PEFT LoRA ``Linear`` (the layer objects stay PEFT's: saving, merging and ``disable_adapter()`` are
untouched). ``undo()`` removes every instance forward it set.

torch and peft are imported inside functions only.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

from ..._markers import hookimpl
from ..._options import Option

NAME = "fused_lora"


def patch_lora_layers(model: Any, state: SimpleNamespace) -> int:
    """Set the fused forward on every PEFT LoRA linear layer of ``model`` not patched yet; returns how many
    were patched now (recorded in ``state.layers`` for ``undo()``)."""
    from .function import is_lora_linear, make_fused_forward

    layers = state.__dict__.setdefault("layers", [])
    count = 0
    for module in model.modules():
        if is_lora_linear(module) and "forward" not in module.__dict__:
            module.forward = make_fused_forward(module)
            layers.append(module)
            count += 1
    return count


def patched_layers(state: SimpleNamespace) -> int:
    """How many layers carry the fused forward (tests, reports)."""
    return sum(1 for m in getattr(state, "layers", []) if getattr(m.__dict__.get("forward"),
                                                                     "__sft_plugins_fused_lora__", False))


def _unpatch(state: SimpleNamespace) -> None:
    for module in getattr(state, "layers", []):
        if getattr(module.__dict__.get("forward"), "__sft_plugins_fused_lora__", False):
            del module.forward
    state.layers = []


@hookimpl
def sft_options() -> list[Option]:
    return []  # nothing to tune: any option given is refused as unknown


@hookimpl
def sft_describe(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": "PEFT LoRA linear layers as one fused autograd function each: no per-adapter input casts, "
                   "scale-and-add in one addmm, only the input and rank-r products saved",
        "loss_parity": 1e-5,  # the same products and sums (fp32: equal up to rounding order)
        "quantized": "LoRA over a frozen 4-bit base: the base weight dequantised per use by bitsandbytes; 8-bit "
                     "LLM.int8() bases run PEFT's own forward",
    }


@hookimpl
def sft_check(model: Any) -> list[str]:
    if model is not None and isinstance(model, str):
        return [f"{NAME} patches the model's LoRA layers: pass a model instance, not {model!r}"]
    return []


@hookimpl
def sft_patch_model(model: Any, state: SimpleNamespace) -> Callable[[], None]:
    patch_lora_layers(model, state)  # a model the user wrapped with peft; SFTTrainer's own wrap: on_train_begin
    return lambda: _unpatch(state)


@hookimpl
def sft_callbacks(state: SimpleNamespace) -> list[Any]:
    from transformers import TrainerCallback

    class FusedLoraPatcher(TrainerCallback):
        """At train begin the trainer's model holds every LoRA layer it will train (peft_config included)."""

        def on_train_begin(self, args: Any, trainer_state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if model is not None:
                patch_lora_layers(model, state)
                if not getattr(state, "layers", None):
                    import logging

                    logging.getLogger("sft_plugins").warning(
                        "%s: the model has no PEFT LoRA linear layers (full fine-tuning?): nothing is fused", NAME)

    return [FusedLoraPatcher()]
