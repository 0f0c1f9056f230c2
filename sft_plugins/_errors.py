"""The one exception the package raises for user-facing problems."""


class PluginError(RuntimeError):
    """A plugin cannot be found, loaded, combined, or used with the given model/args/hardware.

    The message always says what is wrong and how to fix it.
    """
