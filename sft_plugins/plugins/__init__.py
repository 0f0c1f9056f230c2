"""Built-in plugins, one module each; discovered through the `sft_plugins` entry-point group."""
