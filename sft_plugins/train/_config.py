"""``sft-plugins train`` configuration: a TRL ``trl sft`` YAML, parsed by TRL's own ``TrlParser`` into its
own dataclasses (``ScriptArguments``, ``SFTConfig``, ``ModelConfig``, ``DatasetMixtureConfig``), plus two keys
of ours: ``plugins`` (names, in order) and ``plugin_options`` ({name: {...}}). Command-line flags override
the file, as in TRL. Errors are one line naming the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._errors import PluginError


class TrainConfigError(PluginError):
    """A bad configuration file or flag; the CLI prints it as one line and exits 2."""


@dataclass
class PluginArguments:
    """The two keys ``sft-plugins`` adds to a TRL SFT config."""

    plugins: list[str] | None = field(default=None, metadata={
        "help": "plugins to compose, in order, e.g. --plugins fused_ce,packing (see `sft-plugins list`)"})
    plugin_options: str | None = field(default=None, metadata={
        "help": "per-plugin options as JSON, e.g. '{\"packing\": {\"max_length\": 2048}}' (a mapping in YAML)"})

    def names(self) -> list[str]:
        """Plugin names, commas split (``--plugins a,b`` and ``--plugins a b`` alike)."""
        return [n.strip() for item in self.plugins or [] for n in str(item).split(",") if n.strip()]

    def options(self) -> dict[str, dict[str, Any]]:
        value: Any = self.plugin_options
        if value is None or value == "":
            return {}
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise TrainConfigError(f"--plugin_options is not valid JSON (line {exc.lineno}, column {exc.colno}): "
                                       f"{exc.msg}") from None
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise TrainConfigError(f"plugin_options must map plugin names to mappings of options, got {value!r}")
        return value


def dataclass_types() -> tuple[type, ...]:
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig

    return (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, PluginArguments)


def read_config_file(path: pathlib.Path) -> dict[str, Any]:
    """A YAML or JSON config file as a mapping; a malformed one is a one-line error with its line and column
    (``sft-plugins train`` and ``ablate`` read their files through here)."""
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise TrainConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrainConfigError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise TrainConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path} must hold a mapping of options, got a {type(data).__name__}")
    return data


def known_keys() -> list[str]:
    return sorted({f.name for cls in dataclass_types() for f in dataclasses.fields(cls)})


def _check_keys(config: dict[str, Any], source: str) -> None:
    known = set(known_keys()) | {"env"}
    unknown = [k for k in config if k not in known]
    if unknown:
        parts = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
            parts.append(f"{key!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        raise TrainConfigError(f"{source}: unknown key(s) {', '.join(parts)}: not a field of TRL's ScriptArguments, "
                               "SFTConfig, ModelConfig or DatasetMixtureConfig, nor plugins/plugin_options")


def _bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def parse(argv: Sequence[str]) -> tuple[Any, Any, Any, Any, PluginArguments]:
    """``(script_args, sft_config, model_args, dataset_args, plugin_args)`` from ``[--config FILE] [flags]``.

    As ``TrlParser.parse_args_and_config``: the file's ``env`` is exported, its values become the
    parser's defaults, flags override them; but the file is read here so that its errors and unknown keys
    are reported with line, column and the closest valid names."""
    import os

    from trl import TrlParser

    args = list(argv)
    config_path = None
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise TrainConfigError("--config needs a file: sft-plugins train --config sft.yaml")
        config_path = pathlib.Path(args[i + 1])
        del args[i:i + 2]
    parser = TrlParser(dataclass_types(), prog="sft-plugins train")
    # SFTConfig defaults to bf16=True, which refuses to start on a machine without bf16 support: default it
    # to what this machine has (a file or flag that sets it still wins)
    parser.set_defaults_with_config(bf16=_bf16_supported())
    if config_path is not None:
        config = read_config_file(config_path)
        _check_keys(config, str(config_path))
        env = config.pop("env", None) or {}
        if not isinstance(env, dict):
            raise TrainConfigError(f"{config_path}: 'env' must be a mapping of environment variables")
        os.environ.update({k: str(v) for k, v in env.items()})
        if isinstance(config.get("plugin_options"), dict):  # the parser's default: keep it a JSON string
            config["plugin_options"] = json.dumps(config["plugin_options"])
        parser.set_defaults_with_config(**config)
    try:
        *values, remaining = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    except (ValueError, TypeError) as exc:
        raise TrainConfigError(f"{config_path or 'command line'}: {exc}") from None
    if remaining:
        flags = [r for r in remaining if r.startswith("--")] or remaining
        hints = []
        for flag in flags:
            close = difflib.get_close_matches(flag.lstrip("-"), known_keys(), n=2, cutoff=0.6)
            hints.append(flag + (f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""))
        raise TrainConfigError(f"unknown command-line argument(s): {'; '.join(hints)}")
    return tuple(values)  # type: ignore[return-value]
