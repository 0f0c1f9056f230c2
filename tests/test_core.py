"""The core contract of DESIGN.md: discovery, compose, combination rules, prepare and undo."""

from __future__ import annotations

import subprocess
import sys
import types
from typing import Any

import pytest

import sft_plugins
from sft_plugins import PluginError, hookimpl
from sft_plugins.embedded import build_dataset, build_model, build_tokenizer


def make_plugin(name: str, **hooks: Any) -> types.SimpleNamespace:
    """A plugin object whose hookimpls are the given functions."""
    return types.SimpleNamespace(__name__=name, **{k: hookimpl(v) for k, v in hooks.items()})


def sft_args(tmp_path, **overrides):
    from trl import SFTConfig

    base = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, bf16=False, use_cpu=True,
                report_to="none", save_strategy="no", logging_steps=1, max_length=128, learning_rate=1e-3, seed=0)
    return SFTConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# -- discovery ---------------------------------------------------------------------------------

def test_available_without_torch():
    code = ("import sys, sft_plugins; a = sft_plugins.available(); "
            "assert 'torch' not in sys.modules, 'listing plugins imported torch'; print(sorted(a))")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    assert "[" in out.stdout


def test_builtins_are_entry_points():
    from importlib import metadata

    eps = {ep.name: ep for ep in metadata.entry_points(group="sft_plugins")}
    for name in ("fused_ce", "smart_checkpointing", "padding_free", "packing", "adamw_8bit"):
        assert name in eps and eps[name].dist.name == "sft-plugins"
    for name, info in sft_plugins.available().items():
        if info.source == "builtin" and info.ok:
            assert info.hooks and info.version == sft_plugins.__version__


def test_unknown_name_lists_available():
    with pytest.raises(PluginError) as err:
        sft_plugins.compose(["no_such_plugin"])
    message = str(err.value)
    assert "no_such_plugin" in message and "available plugins" in message
    for name, info in sft_plugins.available().items():
        if info.ok:
            assert name in message


def test_broken_entry_point_is_reported_not_fatal(tmp_path, monkeypatch):
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[sft_plugins]\nbroken = no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sft_plugins.refresh()
    try:
        with pytest.warns(UserWarning, match="broken"):
            found = sft_plugins.available()
        assert found["broken"].error and "no_such_module_xyz" in found["broken"].error
        assert found["broken"].distribution == "broken-plugin"
        assert sft_plugins.compose([]).names == []  # others still compose
        with pytest.raises(PluginError, match="cannot be used"):
            sft_plugins.compose(["broken"])
        listing = subprocess.run([sys.executable, "-m", "sft_plugins.cli", "list", "--json"], capture_output=True,
                                 text=True, env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
        assert listing.returncode == 0 and "no_such_module_xyz" in listing.stdout
    finally:
        monkeypatch.undo()
        sft_plugins.refresh()


def test_plugin_without_hooks_rejected():
    with pytest.raises(PluginError, match="no sft_plugins hookimpls"):
        sft_plugins.compose(["empty"], plugins={"empty": types.SimpleNamespace(__name__="empty")})


def test_options_for_unknown_plugin_rejected():
    p = make_plugin("p", sft_callbacks=lambda args: None)
    with pytest.raises(PluginError, match="options given"):
        sft_plugins.compose(["p"], options={"q": {}}, plugins={"p": p})


# -- combination rules -------------------------------------------------------------------------

def test_check_errors_are_collected(tmp_path):
    a = make_plugin("a", sft_check=lambda names: ["needs X: set Y"])
    b = make_plugin("b", sft_check=lambda names, model: ["b says no"] if "a" in names else [])
    stack = sft_plugins.compose(["a", "b"], plugins={"a": a, "b": b})
    with pytest.raises(PluginError) as err:
        stack.prepare(args=sft_args(tmp_path))
    assert "a: needs X: set Y" in str(err.value) and "b: b says no" in str(err.value)


def test_args_merged_and_conflicts_detected(tmp_path):
    a = make_plugin("a", sft_update_args=lambda args: {"logging_steps": 7, "seed": 3})
    b = make_plugin("b", sft_update_args=lambda args: {"seed": 3, "warmup_steps": 2})
    c = make_plugin("c", sft_update_args=lambda args: {"seed": 4})
    args = sft_args(tmp_path)
    out = sft_plugins.compose(["a", "b"], plugins={"a": a, "b": b}).prepare(args=args)
    assert (out["args"].logging_steps, out["args"].seed, out["args"].warmup_steps) == (7, 3, 2)
    assert (args.logging_steps, args.seed) == (1, 0), "the caller's args were mutated"
    with pytest.raises(PluginError, match="a sets seed=3 but c sets seed=4"):
        sft_plugins.compose(["a", "c"], plugins={"a": a, "c": c}).prepare(args=args)


def test_renamed_checkpointing_field_is_one_field(tmp_path):
    a = make_plugin("a", sft_update_args=lambda args: {"gradient_checkpointing": False})
    b = make_plugin("b", sft_update_args=lambda args: {"gradient_checkpointing": True})
    args = sft_args(tmp_path)
    out = sft_plugins.compose(["a"], plugins={"a": a}).prepare(args=args)["args"]
    assert out.gradient_checkpointing is False and getattr(out, "activation_checkpointing", False) is False
    with pytest.raises(PluginError, match="cannot be composed"):
        sft_plugins.compose(["a", "b"], plugins={"a": a, "b": b}).prepare(args=args)


def test_single_answer_hooks_refuse_two_answers(tmp_path):
    for hook, value in (("sft_data_collator", lambda: object()),
                        ("sft_optimizer_cls_and_kwargs", lambda: (object, {})),
                        ("sft_prepare_dataset", lambda dataset: dataset)):
        a, b = make_plugin("a", **{hook: value}), make_plugin("b", **{hook: value})
        stack = sft_plugins.compose(["a", "b"], plugins={"a": a, "b": b})
        with pytest.raises(PluginError, match="a and b both supply"):
            stack.prepare(args=sft_args(tmp_path), train_dataset=[1, 2])


def test_collator_and_optimizer_refuse_user_values(tmp_path):
    col = make_plugin("col", sft_data_collator=lambda: object())
    with pytest.raises(PluginError, match="data_collator= was passed"):
        sft_plugins.compose(["col"], plugins={"col": col}).prepare(args=sft_args(tmp_path), data_collator=object())
    opt = make_plugin("opt", sft_optimizer_cls_and_kwargs=lambda: (object, {}))
    with pytest.raises(PluginError, match="optimizer was passed in optimizers="):
        sft_plugins.compose(["opt"], plugins={"opt": opt}).prepare(args=sft_args(tmp_path), optimizers=(object(), None))
    scheduler = object()  # a scheduler alone stays the user's: Trainer builds the optimizer from the class
    kwargs = sft_plugins.compose(["opt"], plugins={"opt": opt}).prepare(args=sft_args(tmp_path),
                                                                       optimizers=(None, scheduler))
    assert kwargs["optimizers"] == (None, scheduler) and kwargs["optimizer_cls_and_kwargs"] == (object, {})
    with pytest.raises(PluginError, match="optimizer_cls_and_kwargs= was passed"):
        sft_plugins.compose(["opt"], plugins={"opt": opt}).prepare(args=sft_args(tmp_path),
                                                                  optimizer_cls_and_kwargs=(object, {}))


def test_callbacks_concatenated_and_deduplicated(tmp_path):
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback

    class Mine(TrainerCallback):
        pass

    a = make_plugin("a", sft_callbacks=lambda: [Mine(), PrinterCallback()])
    b = make_plugin("b", sft_callbacks=lambda: [Mine(), ProgressCallback()])
    user = PrinterCallback()
    out = sft_plugins.compose(["a", "b"], plugins={"a": a, "b": b}).prepare(args=sft_args(tmp_path), callbacks=[user])
    assert [type(c) for c in out["callbacks"]] == [PrinterCallback, Mine, ProgressCallback]
    assert out["callbacks"][0] is user


def test_patches_undone_in_reverse_order_even_on_failure(tmp_path):
    log: list[str] = []

    def patcher(tag):
        def patch(model):
            log.append(f"patch {tag}")
            return lambda: log.append(f"undo {tag}")
        return patch

    def failing_collator():
        raise RuntimeError("collator failed")

    a, b = make_plugin("a", sft_patch_model=patcher("a")), make_plugin("b", sft_patch_model=patcher("b"))
    with sft_plugins.compose(["a", "b"], plugins={"a": a, "b": b}) as stack:
        stack.prepare(model=object(), args=sft_args(tmp_path))
    assert log == ["patch a", "patch b", "undo b", "undo a"]
    log.clear()
    c = make_plugin("c", sft_data_collator=failing_collator)
    stack = sft_plugins.compose(["a", "c"], plugins={"a": a, "c": c})
    with pytest.raises(RuntimeError, match="collator failed"):
        stack.prepare(model=object(), args=sft_args(tmp_path))
    assert log == ["patch a", "undo a"]


def test_options_reach_only_their_plugin(tmp_path):
    seen = {}
    a = make_plugin("a", sft_callbacks=lambda options: seen.setdefault("a", options) and None)
    b = make_plugin("b", sft_callbacks=lambda options: seen.setdefault("b", options) and None)
    sft_plugins.compose(["a", "b"], options={"a": {"k": 1}}, plugins={"a": a, "b": b}).prepare(args=sft_args(tmp_path))
    assert seen == {"a": {"k": 1}, "b": {}}


# -- every hook into a real trainer ------------------------------------------------------------

class EveryHookPlugin:
    """Implements every hook, records that each fired, and patches class and instance (with undo)."""

    def __init__(self) -> None:
        self.fired: list[str] = []

    @hookimpl
    def sft_describe(self):
        return {"summary": "test plugin", "loss_parity": None}

    @hookimpl
    def sft_check(self, names, args, model):
        self.fired.append("check")
        return []

    @hookimpl
    def sft_update_args(self, args):
        self.fired.append("update_args")
        return {"warmup_steps": 1}

    @hookimpl
    def sft_patch_model(self, model, args):
        self.fired.append("patch_model")
        cls = type(model)
        model.patched_by_test = True
        cls.class_patched_by_test = True

        def undo():
            del model.patched_by_test
            del cls.class_patched_by_test
        return undo

    @hookimpl
    def sft_prepare_dataset(self, dataset, processing_class, args):
        self.fired.append("prepare_dataset")
        return dataset.select(range(32))

    @hookimpl
    def sft_data_collator(self, processing_class, args):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.fired.append("data_collator")
        inner = DataCollatorForLanguageModeling(pad_token_id=processing_class.pad_token_id)

        def collate(examples):
            self.fired.append("collate")
            return inner(examples)
        return collate

    @hookimpl
    def sft_optimizer_cls_and_kwargs(self, model, args):
        import torch

        self.fired.append("optimizer")
        return torch.optim.SGD, {"lr": args.learning_rate}

    @hookimpl
    def sft_callbacks(self, args):
        from transformers import TrainerCallback

        fired = self.fired

        class StepRecorder(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                fired.append("step")
        self.fired.append("callbacks")
        return [StepRecorder()]


def _tokenized(tok, n=64):
    ds = build_dataset(n, form="text")
    return ds.map(lambda ex: tok(ex["text"] + tok.eos_token), remove_columns=["text"])


@pytest.mark.parametrize("trainer_kind", ["sft", "hf"])
def test_every_hook_fires_in_a_real_trainer(tmp_path, tok, trainer_kind):
    import torch
    from transformers import Trainer, TrainingArguments

    plugin = EveryHookPlugin()
    model = build_model(tokenizer=tok)
    before = set(vars(model)), set(vars(type(model)))
    stack = sft_plugins.compose(["every"], plugins={"every": plugin})
    if trainer_kind == "sft":
        from trl import SFTTrainer

        kwargs = stack.prepare(model=model, args=sft_args(tmp_path), train_dataset=build_dataset(64),
                               processing_class=tok)
        trainer = SFTTrainer(**kwargs)
    else:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: F401 - used by the plugin

        args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                 use_cpu=True, report_to="none", save_strategy="no", logging_steps=1)
        kwargs = stack.prepare(model=model, args=args, train_dataset=_tokenized(tok), processing_class=tok)
        trainer = Trainer(**kwargs)
    assert model.patched_by_test and type(model).class_patched_by_test
    trainer.train()
    # the trainer itself adds instance attributes (TRL's fused head, input-grad hooks): only ours must go
    with_trainer = set(vars(model)) - {"patched_by_test"}
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      torch.optim.SGD)
    assert trainer.args.warmup_steps == 1 and len(trainer.train_dataset) == 32
    for event in ("check", "update_args", "patch_model", "prepare_dataset", "data_collator", "optimizer",
                  "callbacks", "collate", "step"):
        assert event in plugin.fired, event
    assert plugin.fired.count("step") == 3
    stack.undo()
    assert set(vars(type(model))) == before[1], "undo left class attributes behind"
    assert set(vars(model)) == with_trainer and before[0] <= with_trainer, "undo left instance attributes behind"


def test_baseline_compose_trains_unchanged(tmp_path, tok):
    """compose([]) returns the user's kwargs unchanged in meaning: same losses as no stack."""
    from trl import SFTTrainer

    def run(use_stack):
        model = build_model(tokenizer=tok)
        kwargs = dict(model=model, args=sft_args(tmp_path), train_dataset=build_dataset(48), processing_class=tok)
        if use_stack:
            prepared = sft_plugins.compose([]).prepare(**kwargs)
            assert prepared.keys() == kwargs.keys() and all(prepared[k] is kwargs[k] for k in kwargs)
            kwargs = prepared
        trainer = SFTTrainer(**kwargs)
        trainer.train()
        return [log["loss"] for log in trainer.state.log_history if "loss" in log]

    assert run(True) == run(False)


def test_prepare_twice_needs_undo(tmp_path):
    p = make_plugin("p", sft_callbacks=lambda: [])
    stack = sft_plugins.compose(["p"], plugins={"p": p})
    stack.prepare(args=sft_args(tmp_path))
    with pytest.raises(PluginError, match="already prepared"):
        stack.prepare(args=sft_args(tmp_path))
    stack.undo()
    stack.prepare(args=sft_args(tmp_path))
