"""Built-in plugins, one package each (hookimpls in its ``__init__``, its engine beside them); what they
share lives in :mod:`.shared`. Discovered through the ``sft_plugins`` entry-point group."""
