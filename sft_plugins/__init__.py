"""sft_plugins: opt-in SFT optimisations as pluggy plugins, composed into an unmodified TRL
``SFTTrainer`` or ``transformers.Trainer``.

    stack = sft_plugins.compose(["fused_ce", "padding_free"])
    trainer = SFTTrainer(**stack.prepare(model=model, args=args, train_dataset=ds, processing_class=tok))

Importing this package does not import torch.
"""

from ._discovery import ENTRY_POINT_GROUP, PluginInfo, available, refresh
from ._errors import PluginError
from ._markers import hookimpl, hookspec
from ._options import Option
from ._stack import Stack, compose

__version__ = "0.1.0"

__all__ = [
    "ENTRY_POINT_GROUP",
    "Option",
    "PluginError",
    "PluginInfo",
    "Stack",
    "available",
    "compose",
    "hookimpl",
    "hookspec",
    "refresh",
    "__version__",
]
