"""What ``sft-plugins train`` trains on: the model (a local path, a hub id, or an embedded preset), its
tokenizer, and the dataset (a local json/jsonl/parquet/arrow file or folder, a hub name, TRL's dataset
mixture, or the embedded generated data), loaded the way ``trl sft`` loads them."""

from __future__ import annotations

import os
import pathlib
import socket
from typing import Any

from ._config import TrainConfigError

DATA_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
EMBEDDED_DATASET_SIZE = 256


def _is_local(name: str) -> bool:
    return pathlib.Path(name).expanduser().exists()


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: only local paths and the Hugging Face cache are used."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def require_hub(what: str, name: str) -> None:
    """Fail in seconds, not after a minute of retries, when ``name`` must come from the Hub and cannot."""
    if hub_offline():
        raise TrainConfigError(f"{what} {name!r} is not a local path and HF_HUB_OFFLINE is set: give a local path "
                               "(a folder saved with save_pretrained, or a data file)")
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as exc:
        raise TrainConfigError(f"{what} {name!r} is not a local path and the Hub ({host}) cannot be reached "
                               f"({exc.__class__.__name__}): give a local path, or set HF_HUB_OFFLINE=1 to use "
                               "what is already in the Hugging Face cache") from None


def _trust_remote_code(model_args: Any, training_args: Any) -> bool:
    # TRL 1.x moved it from ModelConfig to SFTConfig; read either
    return bool(getattr(training_args, "trust_remote_code", None) or getattr(model_args, "trust_remote_code", False))


def load_tokenizer(model_args: Any, training_args: Any) -> Any:
    from ..embedded import PRESETS, build_tokenizer

    name = model_args.model_name_or_path
    if name is None or name in PRESETS:
        return build_tokenizer()
    if not _is_local(name) and not hub_offline():
        require_hub("model", name)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, revision=model_args.model_revision,
                                             trust_remote_code=_trust_remote_code(model_args, training_args))
    except OSError as exc:
        if _is_local(name):
            raise
        raise TrainConfigError(f"model {name!r} is not a local path and is not in the Hugging Face cache "
                               f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): give a local path "
                               f"(a folder saved with save_pretrained) ({type(exc).__name__})") from None


def load_model(model_args: Any, training_args: Any, tokenizer: Any) -> Any:
    """The model instance, as ``trl sft`` would build it from the same ModelConfig (dtype, attention,
    4/8-bit quantisation and its device map); the plugins need the instance to patch it."""
    import tempfile
    from contextlib import nullcontext

    import torch
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config

    from ..embedded import PRESETS, build_model

    quantization = get_quantization_config(model_args)
    kwargs: dict[str, Any] = dict(revision=model_args.model_revision, dtype=model_args.dtype,
                                  trust_remote_code=_trust_remote_code(model_args, training_args),
                                  attn_implementation=model_args.attn_implementation)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        if torch.cuda.is_available():  # a quantised model is placed at load: on this rank's GPU
            from accelerate import PartialState

            kwargs["device_map"] = {"": PartialState().local_process_index}
    kwargs.update(training_args.model_init_kwargs or {})
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    name = model_args.model_name_or_path
    if name is not None and name not in PRESETS:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    dtype = None if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    # 4/8-bit: bitsandbytes quantises while loading, so the preset goes through a folder like any model. Its
    # random init then runs on the GPU it is loaded to, if any: a 1B shape's init takes ~30 s on a 2-core CPU.
    device_map = kwargs.get("device_map") if quantization is not None else None
    gpu = device_map.get("") if isinstance(device_map, dict) else None
    on_gpu = isinstance(gpu, int) and not isinstance(gpu, bool)
    with torch.device("cuda", gpu) if on_gpu else nullcontext():
        model = build_model(name or "tiny", tokenizer=tokenizer, seed=training_args.seed, dtype=dtype,
                            attn_implementation=model_args.attn_implementation or "sdpa")
    if quantization is None:
        return model
    with tempfile.TemporaryDirectory(prefix="sft-plugins-preset-") as folder:
        model.save_pretrained(folder)
        del model
        if on_gpu:
            torch.cuda.empty_cache()  # the full-precision copy's memory, before the quantised load
        kwargs.pop("revision", None)
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def _load_local(path: pathlib.Path, config: str | None) -> Any:
    from datasets import DatasetDict, load_dataset, load_from_disk

    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            data = load_from_disk(str(path))
            return data if isinstance(data, DatasetDict) else DatasetDict({"train": data})
        return load_dataset(str(path), name=config)
    fmt = DATA_FORMATS.get(path.suffix)
    if fmt is None:
        raise TrainConfigError(f"dataset file {path} has an unknown format; use one of {sorted(DATA_FORMATS)}")
    return load_dataset(fmt, data_files=str(path))


def load_datasets(script_args: Any, dataset_args: Any, training_args: Any) -> tuple[Any, Any]:
    """``(train_dataset, eval_dataset or None)``, with the splits the config names."""
    from datasets import DatasetDict

    from ..embedded import build_dataset

    name = script_args.dataset_name
    if dataset_args.datasets:
        from trl import get_dataset

        data = get_dataset(dataset_args)
    elif name is None:
        data = DatasetDict({"train": build_dataset(EMBEDDED_DATASET_SIZE, seed=training_args.seed)})
    elif _is_local(name):
        data = _load_local(pathlib.Path(name).expanduser(), script_args.dataset_config)
    else:
        data = _load_hub_dataset(name, script_args)
    split = script_args.dataset_train_split
    if split not in data:
        raise TrainConfigError(f"the dataset has no split {split!r} (it has {sorted(data)}): set dataset_train_split")
    evaluate = getattr(training_args, "eval_strategy", "no") not in ("no", None) and \
        str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
    eval_data = None
    if evaluate:
        if script_args.dataset_test_split not in data:
            raise TrainConfigError(f"eval_strategy={training_args.eval_strategy} needs the split "
                                   f"{script_args.dataset_test_split!r}, which the dataset lacks ({sorted(data)})")
        eval_data = data[script_args.dataset_test_split]
    return data[split], eval_data


def _load_hub_dataset(name: str, script_args: Any) -> Any:
    """A hub dataset; offline (``HF_HUB_OFFLINE``) from the Hugging Face cache, as ``datasets`` does, with one
    clear line when it is not there."""
    from datasets import load_dataset

    offline = hub_offline()
    if not offline:
        require_hub("dataset", name)
    try:
        return load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
    except Exception as exc:  # offline, datasets raises ConnectionError, FileNotFoundError or its own errors
        if not offline:
            raise
        raise TrainConfigError(f"dataset {name!r} is not a local path and not in the Hugging Face cache "
                               f"(HF_HUB_OFFLINE is set; {type(exc).__name__}): give a local path (a data file "
                               "or folder)") from None


def trainer_inputs(script_args: Any, training_args: Any, model_args: Any, dataset_args: Any) -> dict[str, Any]:
    """The ``SFTTrainer`` keyword arguments a `trl sft` config describes, before any plugin sees them: the
    model instance, its tokenizer, the train (and eval) split and the LoRA config."""
    from trl import get_peft_config

    tokenizer = load_tokenizer(model_args, training_args)
    model = load_model(model_args, training_args, tokenizer)
    train_data, eval_data = load_datasets(script_args, dataset_args, training_args)
    return dict(model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data,
                processing_class=tokenizer, peft_config=get_peft_config(model_args))
