"""``sft-plugins train``: a real fine-tune with the plugins, from a TRL ``trl sft`` config.

    sft-plugins train                                   # the embedded default: tiny model, generated chat data
    sft-plugins train --config sft.yaml                 # your TRL YAML, plus `plugins:` / `plugin_options:`
    sft-plugins train --config sft.yaml --plugins fused_ce,packing --learning_rate 1e-4

It trains with TRL's unmodified ``SFTTrainer``, logs where ``report_to`` says, saves the model (or adapter)
and tokenizer to ``output_dir``, and continues a run with ``--resume_from_checkpoint DIR`` (or ``true``:
the last checkpoint in ``output_dir``). See docs/train.md.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from .._errors import PluginError
from ._config import PluginArguments, TrainConfigError, parse
from ._load import load_datasets, load_model, load_tokenizer, trainer_inputs

__all__ = ["PluginArguments", "TrainConfigError", "load_datasets", "load_model", "load_tokenizer", "main", "train",
           "trainer_inputs"]

EXIT_OK, EXIT_BAD_CONFIG = 0, 2


def _resume_target(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in ("true", "last"):
        return True  # Trainer: the last checkpoint in output_dir
    return value or None


def train(script_args: Any, training_args: Any, model_args: Any, dataset_args: Any,
          plugin_args: PluginArguments) -> Any:
    """Compose the plugins into an unmodified SFTTrainer, train, save; returns the trainer."""
    from trl import SFTTrainer

    import sft_plugins

    names = plugin_args.names()
    stack = sft_plugins.compose(names, options=plugin_args.options())  # bad options fail before loading
    out = pathlib.Path(training_args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainConfigError(f"output_dir {out}: cannot create it ({exc.strerror or exc})") from None
    inputs = trainer_inputs(script_args, training_args, model_args, dataset_args)
    with stack:
        kwargs = stack.prepare(**inputs)
        trainer = SFTTrainer(**kwargs)
        trainer.train(resume_from_checkpoint=_resume_target(training_args.resume_from_checkpoint))
        trainer.save_model(training_args.output_dir)
        if trainer.is_world_process_zero():
            record = {"plugins": names, "plugin_options": stack.options, "report": stack.report,
                      "sft_plugins": sft_plugins.__version__}
            (out / "sft_plugins.json").write_text(json.dumps(record, indent=2, default=repr) + "\n")
        if getattr(training_args, "push_to_hub", False):
            trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        from trl import TrlParser

        from ._config import dataclass_types

        TrlParser(dataclass_types(), prog="sft-plugins train",
                  description=__doc__.split("\n\n")[0]).print_help()
        return EXIT_OK
    try:
        train(*parse(argv))
    except TrainConfigError as exc:
        print(f"sft-plugins train: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except PluginError as exc:
        print(f"sft-plugins train: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return EXIT_OK

