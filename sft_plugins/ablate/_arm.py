"""One ablation arm, in a fresh process: ``python -m sft_plugins.ablate._arm SPEC`` (a JSON file or string).

A fresh process per arm because plugins patch process-global things (model classes, kernels,
allocator state): an arm must not inherit the previous arm's patches, compiled code or peak memory.

The child prints progress events as single lines ``@@sft-ablate {json}`` on stdout (everything else
it prints is the training log) and writes its full result to ``spec["result_path"]``, also when it
fails, so the parent reports the steps done so far. Exit codes: 0 ok, 1 failed, 3 the arm's plugins
do not compose (PluginError).

Measured per optimizer step (see docs/ablate.md):
- ``loss``: the trainer's logged training loss (``logging_steps=1``, so exactly that step's loss);
- ``tokens``: loss-target tokens the model saw, i.e. labels != -100 after the causal shift, counted
  from what the model is called with. Pad and packing filler never count, and a padded batch, a
  padding-free row and a packed row of the same samples count the same;
- ``time_s``: wall time from the previous step's end (train begin for step 1) to this step's end,
  after a CUDA sync: data loading and collation included, since plugins change them too;
- ``cpu_s``: the process's CPU time (all threads) over the same interval: on a CPU shared with other
  work, it stays honest when wall time does not;
- ``peak_memory_bytes``: ``torch.cuda.max_memory_allocated()`` on GPU, the process's peak RSS
  (``ru_maxrss``) on CPU: on GPU the high-water mark since training began (loading the model, a 4-bit one
  especially, can peak higher than a step), on CPU since the process started.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import resource
import sys
import time
import traceback
from typing import Any

from .._discovery import load_object

EVENT_PREFIX = "@@sft-ablate "


def emit(event: str, **data: Any) -> None:
    print(EVENT_PREFIX + json.dumps({"event": event, **data}, default=str), flush=True)


# -- model, data, args ----------------------------------------------------------------------------

def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for, but torch sees no CUDA device")
    return requested


def load_model_and_tokenizer(spec: dict[str, Any], device: str, dtype: Any) -> tuple[Any, Any]:
    import torch

    from sft_plugins.embedded import PRESETS, SMOLLM2, build_model, build_tokenizer, load_smollm2

    name = spec["model"]
    if name == SMOLLM2:
        return load_smollm2(dtype=dtype)
    if name in PRESETS:
        tok = build_tokenizer()
        # Initialising a 1B-parameter model on the GPU takes a second instead of ~20 s on the CPU.
        where = torch.device(device) if device == "cuda" else contextlib.nullcontext()
        with where:
            model = build_model(name, tokenizer=tok, seed=spec["seed"], dtype=dtype)
        return model, tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # documented: then eos labels are masked like pads by the hf collator
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model, tok


def load_data(spec: dict[str, Any], tok: Any = None) -> Any:
    from datasets import load_dataset

    from sft_plugins.embedded import LONG_TAIL, build_dataset, build_token_dataset

    name = spec["dataset"]
    n = spec["dataset_size"] or spec["steps"] * spec["batch_size"]
    if name is None:
        return build_dataset(n, form="conversational", seed=spec["seed"])
    if name == LONG_TAIL:
        return build_token_dataset(n, spec["max_length"], len(tok) if tok is not None else 512, seed=spec["seed"])
    path = pathlib.Path(name).expanduser()
    if path.is_file():
        kind = "parquet" if path.suffix == ".parquet" else "json"
        return load_dataset(kind, data_files=str(path), split="train")
    return load_dataset(name if not path.exists() else str(path), split=spec["dataset_split"])


def tokenize_for_trainer(dataset: Any, tok: Any, max_length: int) -> Any:
    """For plain ``transformers.Trainer``: input_ids + attention_mask from any of TRL's dataset forms."""
    columns = dataset.column_names
    if "input_ids" in columns:
        return dataset

    def ids_of(value: Any) -> list[int]:
        if isinstance(value, list):  # conversational
            out = tok.apply_chat_template(value, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        return tok(value, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]

    def fn(example: dict[str, Any]) -> dict[str, Any]:
        if "messages" in example:
            ids = ids_of(example["messages"])
        elif "prompt" in example and "completion" in example:
            ids = ids_of(example["prompt"] + example["completion"])  # strings or message lists alike
        elif "text" in example:
            ids = ids_of(example["text"])
        else:
            raise ValueError(f"cannot tokenize a dataset with columns {columns}: expected messages, "
                             "prompt+completion, text or input_ids")
        ids = ids[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    return dataset.map(fn, remove_columns=columns)


def build_args(spec: dict[str, Any], device: str, bf16: bool, out_dir: pathlib.Path) -> Any:
    """Training arguments: the trainer's own defaults except what an ablation must fix.

    Kept from the defaults on purpose: TRL's gradient checkpointing (on), scheduler, optimizer
    (adamw_torch_fused), so the baseline is what a user gets out of the box.
    """
    common: dict[str, Any] = dict(
        output_dir=str(out_dir), max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], seed=spec["seed"], data_seed=spec["seed"],
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    common.update(use_cpu=True, bf16=False) if device == "cpu" else common.update(bf16=bf16)
    if spec["trainer"] == "sft":
        from trl import SFTConfig

        return SFTConfig(**common, max_length=spec["max_length"])
    from transformers import TrainingArguments

    return TrainingArguments(**common)


def lora_config(spec: dict[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], target_modules="all-linear",
                      lora_dropout=0.0, task_type="CAUSAL_LM")


def local_plugins(spec: dict[str, Any]) -> dict[str, Any]:
    return {name: load_object(value) for name, value in spec.get("load", {}).items()}


def build_kwargs(spec: dict[str, Any], model: Any, tok: Any, dataset: Any, args: Any) -> dict[str, Any]:
    """The trainer kwargs a user would write (before the stack sees them)."""
    kwargs: dict[str, Any] = dict(model=model, args=args, train_dataset=dataset, processing_class=tok)
    if spec["lora"]:
        if spec["trainer"] == "sft":
            kwargs["peft_config"] = lora_config(spec)
        else:  # plain Trainer has no peft_config=: wrap the model as a user would
            from peft import get_peft_model

            kwargs["model"] = get_peft_model(model, lora_config(spec))
    return kwargs


def make_trainer(spec: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    if spec["trainer"] == "sft":
        from trl import SFTTrainer

        return SFTTrainer(**kwargs)
    from transformers import DataCollatorForLanguageModeling, Trainer

    if kwargs.get("data_collator") is None:  # only when no plugin supplied one (passing it first would conflict)
        kwargs["data_collator"] = DataCollatorForLanguageModeling(kwargs["processing_class"], mlm=False)
    return Trainer(**kwargs)


# -- measuring ------------------------------------------------------------------------------------

def count_tokens(kwargs: dict[str, Any]) -> int:
    """Loss-target tokens of one model call (see the module docstring)."""
    shift = kwargs.get("shift_labels")
    if shift is not None:
        return int((shift != -100).sum())
    labels = kwargs.get("labels")
    if labels is not None:
        return int((labels[..., 1:] != -100).sum())
    mask = kwargs.get("attention_mask")
    if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
        return int(mask.sum()) - mask.shape[0]
    ids = kwargs.get("input_ids")
    return int(ids.numel()) if ids is not None else 0


def peak_memory(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def make_recorder(device: str, result: dict[str, Any]) -> Any:
    import torch
    from transformers import TrainerCallback

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.tokens = 0
            self.last = self.last_cpu = 0.0
            self.rows: dict[int, dict[str, Any]] = {}

        def hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if module.training:
                self.tokens += count_tokens(kwargs)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            self.last, self.last_cpu = time.perf_counter(), time.process_time()
            result["memory_at_train_begin_bytes"] = peak_memory(device)
            if device == "cuda":  # the steps' peak, not the load's (a 4-bit load peaks above a QLoRA step)
                torch.cuda.reset_peak_memory_stats()
            emit("train_begin")

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            now, cpu = time.perf_counter(), time.process_time()
            self.rows[state.global_step] = {"step": state.global_step, "loss": None, "tokens": self.tokens,
                                            "time_s": now - self.last, "cpu_s": cpu - self.last_cpu,
                                            "peak_memory_bytes": peak_memory(device)}
            self.tokens, self.last, self.last_cpu = 0, now, cpu

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            row = self.rows.get(state.global_step)
            if row is None or not logs or "loss" not in logs or row in result["steps"]:
                return
            row["loss"] = float(logs["loss"])
            result["steps"].append(row)
            emit("step", **row)

    return Recorder()


# -- the two modes --------------------------------------------------------------------------------

def _setup(spec: dict[str, Any], result: dict[str, Any]) -> tuple[str, Any, bool]:
    import torch

    device = resolve_device(spec["device"])
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    result.update(device=device, dtype=str(dtype).removeprefix("torch."), bf16=bf16,
                  device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  memory_kind="cuda max_memory_allocated since train begin" if device == "cuda" else "process peak RSS",
                  versions=_versions())
    return device, dtype, bf16


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "trl", "peft", "sft-plugins"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def trl_config_kwargs(spec: dict[str, Any], out_dir: pathlib.Path) -> dict[str, Any]:
    """The trainer kwargs of a `trl sft` config, built as ``sft-plugins train`` builds them, with what an
    ablation must fix: ``max_steps`` (the arm's steps), no checkpoints, a log every step, the arm's own
    ``output_dir`` and ``run_name`` (so ``report_to`` shows one curve per arm)."""
    import dataclasses

    from sft_plugins.train import trainer_inputs
    from sft_plugins.train._config import parse

    script_args, args, model_args, dataset_args, _ = parse(["--config", spec["trl_config"], *spec.get("trl_flags", [])])
    args = dataclasses.replace(args, max_steps=spec["steps"], save_strategy="no", logging_steps=1,
                               output_dir=str(out_dir), run_name=spec["arm"], disable_tqdm=True,
                               eval_strategy="no", push_to_hub=False)
    return trainer_inputs(script_args, args, model_args, dataset_args)


def _inputs(spec: dict[str, Any], device: str, dtype: Any, bf16: bool, out_dir: pathlib.Path) -> dict[str, Any]:
    """The trainer kwargs a user would write (before the stack sees them)."""
    if spec.get("trl_config"):
        return trl_config_kwargs(spec, out_dir)
    model, tok = load_model_and_tokenizer(spec, device, dtype)
    dataset = load_data(spec, tok)
    if spec["trainer"] == "hf":
        dataset = tokenize_for_trainer(dataset, tok, spec["max_length"])
    return build_kwargs(spec, model, tok, dataset, build_args(spec, device, bf16, out_dir))


def train(spec: dict[str, Any], result: dict[str, Any]) -> None:
    import sft_plugins

    t0 = time.perf_counter()
    device, dtype, bf16 = _setup(spec, result)
    from transformers import set_seed

    set_seed(spec["seed"])
    emit("phase", phase="loading model")
    user_kwargs = _inputs(spec, device, dtype, bf16, pathlib.Path(spec["arm_dir"]) / "trainer")
    model = user_kwargs["model"]
    result["model_parameters"] = sum(p.numel() for p in model.parameters())
    emit("phase", phase="composing")
    stack = sft_plugins.compose(spec["plugins"], spec["options"], plugins=local_plugins(spec))
    result["describe"] = stack.describe()
    kwargs = stack.prepare(**user_kwargs)
    try:
        result["stack_report"] = json.loads(json.dumps(stack.report, default=str))
        set_seed(spec["seed"])  # same RNG state at trainer construction in every arm, whatever prepare did
        trainer = make_trainer(spec, kwargs)
        recorder = make_recorder(device, result)
        trainer.add_callback(recorder)
        trainer.model.register_forward_pre_hook(recorder.hook, with_kwargs=True)
        result["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        result["setup_s"] = time.perf_counter() - t0
        emit("phase", phase="training")
        t1 = time.perf_counter()
        trainer.train()
        result["train_s"] = time.perf_counter() - t1
    finally:
        stack.undo()


def check(spec: dict[str, Any], result: dict[str, Any]) -> None:
    """Preflight: compose and prepare every arm of ``spec["check_arms"]`` on a fresh model; no training."""
    import sft_plugins

    device, dtype, bf16 = _setup(spec, result)
    out_dir = pathlib.Path(spec["arm_dir"]) / "trainer"
    problems: dict[str, str] = {}
    for arm in spec["check_arms"]:
        emit("phase", phase=f"checking {arm['name']}")
        kwargs = _inputs({**spec, "dataset_size": 64, "arm": arm["name"]}, device, dtype, bf16, out_dir)
        data = kwargs["train_dataset"]
        if len(data) > 64:
            kwargs["train_dataset"] = data.select(range(64))  # plugins may transform it in prepare: keep it cheap
        try:
            stack = sft_plugins.compose(arm["plugins"], arm["options"], plugins=local_plugins(spec))
            stack.prepare(**kwargs)
            stack.undo()
        except sft_plugins.PluginError as exc:
            problems[arm["name"]] = str(exc)
    result["problems"] = problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m sft_plugins.ablate._arm SPEC.json|'{json}'", file=sys.stderr)
        return 2
    raw = argv[0] if argv[0].lstrip().startswith("{") else pathlib.Path(argv[0]).read_text()
    spec = json.loads(raw)
    result: dict[str, Any] = {"arm": spec.get("arm"), "plugins": spec.get("plugins", []), "status": "running",
                              "steps": [], "pid": os.getpid()}
    code = 0
    try:
        from sft_plugins import PluginError

        try:
            (check if spec.get("mode") == "check" else train)(spec, result)
            result["status"] = "ok"
        except PluginError as exc:
            result.update(status="invalid", error=" ".join(str(exc).split()), traceback=traceback.format_exc())
            code = 3
    except BaseException as exc:  # the parent reports any failure of the arm; it must not lose the result
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000], traceback=traceback.format_exc())
        code = 1
        traceback.print_exc()
    finally:
        path = spec.get("result_path")
        if path:
            tmp = pathlib.Path(path).with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1, default=str))
            tmp.replace(path)
        emit("done", status=result["status"])
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
