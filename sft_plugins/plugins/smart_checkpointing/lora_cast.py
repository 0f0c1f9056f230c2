"""``smart_checkpointing`` option ``lean_lora_cast``: no round trip of a LoRA input through fp32 under autocast.

PEFT keeps the adapters of a bf16 base in fp32 (``get_peft_model(..., autocast_adapter_dtype=True)``, its
default) and casts each LoRA layer's input to the adapter dtype before ``lora_A``
(``BaseTunerLayer._cast_input_dtype``). Under autocast, ``lora_A``'s matmul casts that fp32 copy straight
back to the autocast dtype, so the copy changes no value: bf16/fp16 -> fp32 is exact, and fp32 -> the
autocast dtype rounds as the direct cast does; in backward the gradient goes bf16 -> fp32 -> bf16, also
exact. A checkpointed layer runs its projections twice (forward and recompute) and pays both casts each
time: for a [16k, 8192] input (a Llama-3.2-1B down projection at 16k tokens), a 512 MiB fp32 copy and
~1.5 GiB of memory traffic. PEFT's bitsandbytes layers already skip the cast under autocast.

Skipped only where that holds: autocast on for the input's device, an fp32 adapter, and, on every active
adapter, no dropout (dropout in fp32 and then a cast would round twice) and no LoRA variant (DoRA and others
use the cast input elsewhere). Anything else goes to PEFT's own cast.
"""

from __future__ import annotations

from typing import Any

import torch

from ..shared.lora import dropout_off

_LOW = (torch.bfloat16, torch.float16)


def lora_cast_modules(layer: Any) -> list[Any]:
    """The PEFT LoRA layers inside ``layer`` that cast their input (``_cast_input_dtype``)."""
    return [m for m in layer.modules()
            if callable(getattr(m, "_cast_input_dtype", None)) and hasattr(m, "lora_A") and hasattr(m, "lora_dropout")]


def _plain_adapters(module: Any) -> bool:
    variants = getattr(module, "lora_variant", {})
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        drop = module.lora_dropout[name]
        if name in variants or not (dropout_off(drop) or (isinstance(drop, torch.nn.Dropout) and not drop.training)):
            return False
    return True


def make_lean_cast(module: Any) -> Any:
    """The module's ``_cast_input_dtype`` that returns the input as is where autocast undoes the cast."""
    peft_cast = module._cast_input_dtype  # bound to the module: PEFT's own

    def cast_input_dtype(x: Any, dtype: torch.dtype) -> Any:
        if (isinstance(x, torch.Tensor) and dtype == torch.float32 and x.dtype in _LOW
                and torch.is_autocast_enabled(x.device.type) and _plain_adapters(module)):
            return x
        return peft_cast(x, dtype)

    return cast_input_dtype
