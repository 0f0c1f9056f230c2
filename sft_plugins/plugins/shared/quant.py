"""bitsandbytes-quantised layers, as the plugins that re-implement a layer (``smart_checkpointing``'s lean
MLP, ``fused_ce``'s LM head) meet them on a QLoRA base.

A 4-bit ``Linear4bit`` (NF4 or FP4, double-quantised or not) is dequantised with bitsandbytes' own
kernel, exactly the weight its ``matmul_4bit`` multiplies by in training (bitsandbytes' ``MatMul4Bit``
dequantises and runs a dense matmul for more than one row). An 8-bit ``Linear8bitLt`` is not: LLM.int8()
also quantises the activations (with fp16 outliers), which a dense product cannot reproduce.
"""

from __future__ import annotations

from typing import Any


def quantization_of(module: Any) -> str | None:
    """``"4bit"`` for a bitsandbytes ``Linear4bit`` (and subclasses), ``"8bit"`` for ``Linear8bitLt``,
    else None. Looks at class names along the MRO, so bitsandbytes is never imported for a plain model."""
    names = {(k.__module__.split(".")[0], k.__name__) for k in type(module).__mro__}
    if ("bitsandbytes", "Linear4bit") in names:
        return "4bit"
    if ("bitsandbytes", "Linear8bitLt") in names:
        return "8bit"
    return None


def dequantized_weight(module: Any, dtype: Any) -> Any:
    """The dense ``[out_features, in_features]`` weight of a bitsandbytes ``Linear4bit`` in ``dtype``."""
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(module)  # what Linear4bit.forward does first (FSDP can drop it)
    weight = module.weight
    return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)


def quantized_layers(model: Any) -> dict[str, int]:
    """How many bitsandbytes-quantised linear layers the model holds, by kind (``{"4bit": 112}``)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        kind = quantization_of(module)
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    return counts
