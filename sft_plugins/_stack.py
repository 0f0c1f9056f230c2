"""Composing plugins into the keyword arguments of an unmodified ``SFTTrainer`` or ``Trainer``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import pluggy

from . import hookspecs
from ._discovery import PluginInfo, resolve
from ._errors import PluginError
from ._markers import PROJECT
from ._options import validate_options

logger = logging.getLogger("sft_plugins")

# transformers >= 5.2x renamed these; older releases (5.17 and before) only know the old names.
_ARG_ALIASES = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def _canonical_field(args: Any, name: str) -> str:
    new = _ARG_ALIASES.get(name)
    if new is None:
        old = {v: k for k, v in _ARG_ALIASES.items()}.get(name)
        return name if old is None or hasattr(args, name) else old
    return new if hasattr(args, new) else name


def replace_args(args: Any, overrides: Mapping[str, Any]) -> Any:
    """A validated copy of ``args`` with ``overrides`` (aliases of renamed fields handled)."""
    if not overrides:
        return args
    changes: dict[str, Any] = {}
    for name, value in overrides.items():
        field = _canonical_field(args, name)
        if not hasattr(args, field):
            raise PluginError(f"{type(args).__name__} has no field {name!r}")
        changes[field] = value
        old = {v: k for k, v in _ARG_ALIASES.items()}.get(field)
        if old is not None and hasattr(args, old):
            changes[old] = value  # keep the deprecated mirror consistent, or __post_init__ resurrects it
    if dataclasses.is_dataclass(args):
        return dataclasses.replace(args, **changes)
    raise PluginError(f"args must be a TrainingArguments/SFTConfig dataclass, got {type(args).__name__}")


class Stack:
    """An ordered set of plugins, applied to a trainer's keyword arguments by :meth:`prepare`.

    ``undo()`` (or leaving ``with stack:``) reverses every patch the stack made and drops the plugins'
    per-stack ``state``; the stack may then be prepared again, from a clean state.
    """

    def __init__(self, plugins: Sequence[PluginInfo], options: Mapping[str, Mapping[str, Any]] | None = None):
        self.plugins: list[PluginInfo] = list(plugins)
        self.names: list[str] = [p.name for p in self.plugins]
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.names))
        if unknown:
            raise PluginError(f"options given for plugins not in the stack: {unknown}; stack is {self.names}")
        self._pm = pluggy.PluginManager(PROJECT)
        self._pm.add_hookspecs(hookspecs)
        for info in self.plugins:
            try:
                self._pm.register(info.obj, name=info.name)
            except (pluggy.PluginValidationError, ValueError) as exc:
                raise PluginError(f"plugin {info.name!r} does not fit the hookspecs: {exc}") from exc
        # validated now, before the caller builds a model: a typo fails at compose(), not at prepare()
        self.options: dict[str, dict[str, Any]] = {
            info.name: validate_options(info.name, info.options, options.get(info.name, {})) for info in self.plugins}
        self._state: dict[str, SimpleNamespace] = {}
        self._undos: list[tuple[str, Callable[[], None]]] = []
        self._prepared = False
        self.report: dict[str, Any] = {}

    # -- calling hooks -------------------------------------------------------------------------
    def _call(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call ``hook`` on each plugin in the user's order; return ``(plugin, answer)`` for non-None."""
        impls = getattr(self._pm.hook, hook).get_hookimpls()
        order = {n: i for i, n in enumerate(self.names)}
        answers = []
        for impl in sorted(impls, key=lambda i: order[i.plugin_name]):
            available = {**kwargs, **self._common(impl.plugin_name)}
            result = impl.function(**{a: available[a] for a in impl.argnames})
            if result is not None:
                answers.append((impl.plugin_name, result))
        return answers

    def _common(self, name: str) -> dict[str, Any]:
        """What every hook may take besides its own arguments (see hookspecs)."""
        state = self._state.setdefault(name, SimpleNamespace())
        return {"options": self.options[name], "names": list(self.names), "state": state}

    def state_of(self, name: str) -> SimpleNamespace | None:
        """The per-stack state of plugin ``name`` while the stack is prepared (tests, debugging)."""
        return self._state.get(name)

    def _single(self, hook: str, what: str, **kwargs: Any) -> tuple[str, Any] | None:
        answers = self._call(hook, **kwargs)
        if len(answers) > 1:
            who = " and ".join(n for n, _ in answers)
            raise PluginError(f"{who} both supply the {what}; only one can: compose one of them")
        return answers[0] if answers else None

    def describe(self) -> dict[str, dict[str, Any]]:
        return {name: answer for name, answer in self._call("sft_describe")}

    # -- the public steps ----------------------------------------------------------------------
    def prepare(self, **kwargs: Any) -> dict[str, Any]:
        """Return the trainer's keyword arguments with this stack's changes applied.

        Order: check, args, model patches, datasets, collator, optimizer, callbacks. The caller's
        ``args`` object is never mutated; a failure part-way undoes the patches already made.
        """
        if self._prepared:
            raise PluginError("this stack is already prepared; call stack.undo() before preparing again")
        out = dict(kwargs)
        model, args = out.get("model"), out.get("args")
        self._state = {}
        errors = [f"{name}: {msg}" for name, msgs in self._call("sft_check", args=args, model=model) for msg in msgs]
        if errors:
            raise PluginError("cannot compose " + "+".join(self.names) + ":\n  " + "\n  ".join(errors))

        args = self._apply_args(args)
        if "args" in kwargs:
            out["args"] = args
        self._prepared = True
        try:
            self._patch_model(model, args)
            self._apply_datasets(out, args)
            self._apply_collator(out, args)
            self._apply_optimizer(out, model, args)
            self._apply_callbacks(out, args)
        except BaseException:
            self.undo()
            raise
        return out

    def _apply_args(self, args: Any) -> Any:
        merged: dict[str, tuple[str, Any]] = {}
        for name, overrides in self._call("sft_update_args", args=args):
            if args is None:
                raise PluginError(f"{name} needs to set training arguments: pass args=SFTConfig(...) "
                                  "or args=TrainingArguments(...) to prepare()")
            for field, value in overrides.items():
                key = _canonical_field(args, field)
                if key in merged and merged[key][1] != value:
                    other, theirs = merged[key]
                    raise PluginError(f"{other} sets {key}={theirs!r} but {name} sets {key}={value!r}; "
                                      "these plugins cannot be composed")
                merged[key] = (name, value)
        overrides = {k: v for k, (_, v) in merged.items()}
        changed = {k: v for k, v in overrides.items() if getattr(args, k, object()) != v}
        if changed:
            logger.info("sft_plugins: args overrides %s", changed)
        self.report["args"] = {k: {"value": v, "by": merged[k][0]} for k, v in changed.items()}
        return replace_args(args, overrides) if overrides else args

    def _patch_model(self, model: Any, args: Any) -> None:
        impls = getattr(self._pm.hook, "sft_patch_model").get_hookimpls()
        if impls and model is None:
            raise PluginError("a plugin patches the model: pass model=<a PreTrainedModel instance> to prepare()")
        order = {n: i for i, n in enumerate(self.names)}
        for impl in sorted(impls, key=lambda i: order[i.plugin_name]):
            available = {"model": model, "args": args, **self._common(impl.plugin_name)}
            undo = impl.function(**{a: available[a] for a in impl.argnames})
            if undo is not None:
                if not callable(undo):
                    raise PluginError(f"{impl.plugin_name}.sft_patch_model must return an undo callable or None")
                self._undos.append((impl.plugin_name, undo))
        self.report["patched_by"] = [n for n, _ in self._undos]

    def _apply_datasets(self, out: dict[str, Any], args: Any) -> None:
        for key, split in (("train_dataset", "train"), ("eval_dataset", "eval")):
            if out.get(key) is None:
                continue
            answer = self._single("sft_prepare_dataset", f"{key} transform", dataset=out[key],
                                  processing_class=out.get("processing_class"), args=args, split=split,
                                  formatting_func=out.get("formatting_func"))
            if answer is not None:
                out[key] = answer[1]
                self.report[key] = answer[0]

    def _apply_collator(self, out: dict[str, Any], args: Any) -> None:
        answer = self._single("sft_data_collator", "data collator",
                              processing_class=out.get("processing_class"), args=args)
        if answer is None:
            return
        if out.get("data_collator") is not None:
            raise PluginError(f"{answer[0]} supplies the data collator, and data_collator= was passed too: "
                              f"drop data_collator= or the {answer[0]} plugin")
        out["data_collator"] = answer[1]
        self.report["data_collator"] = answer[0]

    def _apply_optimizer(self, out: dict[str, Any], model: Any, args: Any) -> None:
        answer = self._single("sft_optimizer_cls_and_kwargs", "optimizer", model=model, args=args)
        if answer is None:
            return
        optimizers = out.get("optimizers")
        # (None, scheduler) is fine: Trainer builds the optimizer from optimizer_cls_and_kwargs and
        # keeps the user's scheduler; only a ready optimizer conflicts
        if optimizers is not None and optimizers[0] is not None:
            raise PluginError(f"{answer[0]} supplies the optimizer, and an optimizer was passed in optimizers= "
                              f"too: drop it (a scheduler alone, optimizers=(None, scheduler), is fine) or "
                              f"the {answer[0]} plugin")
        if out.get("optimizer_cls_and_kwargs") is not None:
            raise PluginError(f"{answer[0]} supplies the optimizer, and optimizer_cls_and_kwargs= was passed "
                              f"too: drop one of them")
        out["optimizer_cls_and_kwargs"] = answer[1]
        self.report["optimizer"] = answer[0]

    def _apply_callbacks(self, out: dict[str, Any], args: Any) -> None:
        added = [(name, cb) for name, cbs in self._call("sft_callbacks", args=args) for cb in cbs]
        if not added:
            return
        callbacks = list(out.get("callbacks") or [])
        seen = {cb if isinstance(cb, type) else type(cb) for cb in callbacks}
        for name, cb in added:
            cls = cb if isinstance(cb, type) else type(cb)
            if cls in seen:
                continue
            seen.add(cls)
            callbacks.append(cb)
            self.report.setdefault("callbacks", []).append(f"{name}:{cls.__name__}")
        out["callbacks"] = callbacks

    def undo(self) -> None:
        """Reverse every patch, last first. Safe to call twice."""
        errors = []
        while self._undos:
            name, undo = self._undos.pop()
            try:
                undo()
            except Exception as exc:  # keep undoing the rest; report all at the end
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
        self._prepared = False
        self._state = {}
        if errors:
            raise PluginError("undo failed for: " + "; ".join(errors))

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"Stack({self.names!r})"


def compose(names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None, *,
            plugins: Mapping[str, Any] | None = None) -> Stack:
    """Build a :class:`Stack` from plugin names, in the user's order.

    ``options`` maps a plugin name to its options. ``plugins`` adds plugins that are not installed
    as entry points (name -> module or object carrying hookimpls), e.g. in tests and notebooks.
    """
    if isinstance(names, str):
        raise PluginError(f"compose() takes a list of names, not the string {names!r}")
    return Stack(resolve(list(names), dict(plugins or {})), options)
