"""What the built-in plugins share, and the only module one plugin may import from another's side:
the padding-free collator and label building (``padding_free`` and ``packing``), packed-row model checks,
FSDP2 detection (``fused_ce``, ``smart_checkpointing``, ``adamw_8bit``), bitsandbytes-quantised layers
(``fused_ce``'s head, ``smart_checkpointing``'s lean MLP), and LoRA projections computed by hand
(``shared.lora``, imported from the engine modules that compute them: it imports torch).

No torch import at module level: plugins import this from their hookimpl modules.
"""

from .collate import PackedCollator, build_labels, make_packed_collator
from .fsdp import fsdp_requested, is_dtensor, is_fsdp_module, unsharded_class
from .model import (
    FLASH_IMPLS,
    PACKED_IMPL_PREFIX,
    neftune_errors,
    packed_model_errors,
    patch_use_cache,
    wants_cuda,
)
from .profile import profile_range
from .quant import dequantized_weight, quantization_of, quantized_layers

__all__ = [
    "FLASH_IMPLS",
    "PACKED_IMPL_PREFIX",
    "PackedCollator",
    "build_labels",
    "dequantized_weight",
    "fsdp_requested",
    "is_dtensor",
    "is_fsdp_module",
    "make_packed_collator",
    "neftune_errors",
    "packed_model_errors",
    "patch_use_cache",
    "profile_range",
    "quantization_of",
    "quantized_layers",
    "unsharded_class",
    "wants_cuda",
]
