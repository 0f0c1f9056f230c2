"""The hooks a plugin may implement.

Every hook is called with keyword arguments and a hookimpl may declare any subset of them. Besides
the arguments listed, every hook may also take ``options``: the plugin's own options dict, as given
to ``compose(options={name: {...}})`` (empty when none were given).

How the answers of several plugins combine is fixed per hook (see docs/architecture.md): no hook is
``firstresult``; where only one answer can win, two answers are an error, so an ablation never
depends on registration order.
"""

from __future__ import annotations

from typing import Any, Callable

from ._markers import hookspec


@hookspec
def sft_describe(options: dict[str, Any]) -> dict[str, Any] | None:
    """Describe the plugin: ``{"summary": str, "loss_parity": float | None}``.

    ``loss_parity`` is the relative per-step loss tolerance (fp32) this plugin promises against the
    baseline, or None when it changes what is trained on or how (packing, 8-bit optimiser state).
    The ablation runner reads it to give its parity verdict.
    """


@hookspec
def sft_check(names: list[str], args: Any, model: Any, options: dict[str, Any]) -> list[str] | None:
    """Return reasons why this plugin cannot run with these plugins, args and model.

    Every plugin's reasons are collected; any reason makes ``prepare`` raise ``PluginError``.
    Each reason should name the fix.
    """


@hookspec
def sft_update_args(args: Any, options: dict[str, Any]) -> dict[str, Any] | None:
    """Return training-argument overrides (field name -> value), or None.

    Overrides of all plugins are merged into a copy of the user's args; two plugins setting one
    field to different values is an error. The user's args object is never mutated.
    """


@hookspec
def sft_patch_model(model: Any, args: Any, options: dict[str, Any]) -> Callable[[], None] | None:
    """Patch the model (or its classes) in place and return a callable that undoes the patch.

    Applied in the user's order; ``Stack.undo()`` calls the undos in reverse order.
    """


@hookspec
def sft_prepare_dataset(dataset: Any, processing_class: Any, args: Any, options: dict[str, Any]) -> Any:
    """Return a transformed dataset (e.g. packed), or None to leave it alone.

    Called once for ``train_dataset`` and once for ``eval_dataset`` when given. At most one plugin
    may answer.
    """


@hookspec
def sft_data_collator(processing_class: Any, args: Any, options: dict[str, Any]) -> Any:
    """Return a data collator, or None. At most one plugin may answer, and not when the user
    passed ``data_collator=`` themselves."""


@hookspec
def sft_optimizer_cls_and_kwargs(model: Any, args: Any, options: dict[str, Any]) -> tuple[type, dict[str, Any]] | None:
    """Return ``(optimizer_class, kwargs)`` for the trainer's ``optimizer_cls_and_kwargs=``, or None.

    At most one plugin may answer, and not when the user passed ``optimizers=`` or
    ``optimizer_cls_and_kwargs=`` themselves (HF ``Trainer`` forbids both).
    """


@hookspec
def sft_callbacks(args: Any, options: dict[str, Any]) -> list[Any] | None:
    """Return ``TrainerCallback`` instances to add. All answers are concatenated, after the user's
    own callbacks, keeping the first callback of each class."""
