"""pluggy markers for the ``sft_plugins`` project (kept apart so plugins import nothing heavy)."""

import pluggy

PROJECT = "sft_plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
