"""The hooks a plugin may implement.

Every hook is called with keyword arguments and a hookimpl may declare any subset of them. Besides
the arguments listed per hook, the stack offers every hook of ``prepare()`` three more:

``options``
    the plugin's own options, validated against its ``sft_options`` schema at ``compose()`` time, with
    the defaults filled in (as given, unchecked, for a plugin without a schema);
``names``
    the names of the composed stack, in the user's order (e.g. to step aside for another plugin);
``state``
    a per-stack, per-plugin namespace (``types.SimpleNamespace``) that lives from the start of
    ``prepare()`` until ``undo()`` drops it. What one hook makes and a later hook needs (a patch handle
    for a callback, the datasets a callback re-packs) goes here, never into module globals, so two
    stacks in one process never see each other's runs. Plugins never read another plugin's state.

How the answers of several plugins combine is fixed per hook (see docs/architecture.md): no hook is
``firstresult``; where only one answer can win, two answers are an error, so an ablation never
depends on registration order.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

from ._markers import hookspec
from ._options import Option


@hookspec
def sft_options() -> list[Option] | None:
    """Declare the plugin's options: a list of :class:`sft_plugins.Option` (name, accepted values,
    default, one-line doc). ``compose()`` validates the user's options against it and fills in defaults;
    ``sft-plugins info NAME`` prints it. Called without arguments, outside any stack."""


@hookspec
def sft_describe(options: dict[str, Any]) -> dict[str, Any] | None:
    """Describe the plugin: ``{"summary": str, "loss_parity": float | None}``.

    ``loss_parity`` is the relative per-step loss tolerance (fp32) this plugin promises against the
    baseline, or None when it changes what is trained on or how (packing, 8-bit optimiser state).
    The ablation runner reads it to give its parity verdict. Called outside any stack (no names/state).
    """


@hookspec
def sft_check(names: list[str], args: Any, model: Any, options: dict[str, Any],
              state: SimpleNamespace) -> list[str] | None:
    """Return reasons why this plugin cannot run with these plugins, args and model.

    Every plugin's reasons are collected; any reason makes ``prepare`` raise ``PluginError``.
    Each reason should name the fix.
    """


@hookspec
def sft_update_args(args: Any, options: dict[str, Any], names: list[str],
                    state: SimpleNamespace) -> dict[str, Any] | None:
    """Return training-argument overrides (field name -> value), or None.

    Overrides of all plugins are merged into a copy of the user's args; two plugins setting one
    field to different values is an error. The user's args object is never mutated.
    """


@hookspec
def sft_patch_model(model: Any, args: Any, options: dict[str, Any], names: list[str],
                    state: SimpleNamespace) -> Callable[[], None] | None:
    """Patch the model (or its classes) in place and return a callable that undoes the patch.

    Applied in the user's order; ``Stack.undo()`` calls the undos in reverse order.
    """


@hookspec
def sft_prepare_dataset(dataset: Any, processing_class: Any, args: Any, options: dict[str, Any],
                        names: list[str], state: SimpleNamespace, split: str,
                        formatting_func: Callable[..., Any] | None) -> Any:
    """Return a transformed dataset (e.g. packed), or None to leave it alone.

    Called once for ``train_dataset`` and once for ``eval_dataset`` when given; ``split`` says which
    (``"train"`` or ``"eval"``); ``formatting_func`` is the one given to ``prepare()`` (SFTTrainer's
    keyword), so a plugin that prepares a raw dataset itself does it as the trainer would. At most one
    plugin may answer.
    """


@hookspec
def sft_data_collator(processing_class: Any, args: Any, options: dict[str, Any], names: list[str],
                      state: SimpleNamespace) -> Any:
    """Return a data collator, or None. At most one plugin may answer, and not when the user
    passed ``data_collator=`` themselves."""


@hookspec
def sft_optimizer_cls_and_kwargs(model: Any, args: Any, options: dict[str, Any], names: list[str],
                                 state: SimpleNamespace) -> tuple[type, dict[str, Any]] | None:
    """Return ``(optimizer_class, kwargs)`` for the trainer's ``optimizer_cls_and_kwargs=``, or None.

    At most one plugin may answer, and not when the user passed ``optimizers=`` or
    ``optimizer_cls_and_kwargs=`` themselves (HF ``Trainer`` forbids both).
    """


@hookspec
def sft_callbacks(args: Any, options: dict[str, Any], names: list[str], state: SimpleNamespace) -> list[Any] | None:
    """Return ``TrainerCallback`` instances to add. All answers are concatenated, after the user's
    own callbacks, keeping the first callback of each class."""
