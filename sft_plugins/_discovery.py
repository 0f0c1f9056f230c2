"""Finding plugins: the ``sft_plugins`` entry-point group, for built-ins and third parties alike.

Loading a plugin imports only its hookimpl module; plugin modules keep torch and friends inside
their functions, so listing plugins stays cheap.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from . import hookspecs
from ._errors import PluginError
from ._markers import PROJECT
from ._options import Option, option_defaults

ENTRY_POINT_GROUP = "sft_plugins"
OWN_DISTRIBUTION = "sft-plugins"
HOOK_NAMES: tuple[str, ...] = tuple(
    name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("sft_")
)


@dataclass(frozen=True)
class PluginInfo:
    """What is known about one plugin without running it."""

    name: str
    source: str  # "builtin", "entry point" or "local" (passed to compose(plugins=...))
    distribution: str | None
    version: str | None
    value: str  # the entry point's value, e.g. "sft_plugins.plugins.packing"
    hooks: tuple[str, ...] = ()
    summary: str = ""
    loss_parity: float | None = None
    quantized: str = ""  # what it does on a bitsandbytes 4-/8-bit (QLoRA) base
    options: tuple[Option, ...] | None = None  # the plugin's option schema (None: it declares none)
    error: str | None = None
    obj: Any = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "distribution": self.distribution,
            "version": self.version,
            "value": self.value,
            "hooks": list(self.hooks),
            "summary": self.summary,
            "loss_parity": self.loss_parity,
            "quantized": self.quantized,
            "options": None if self.options is None else [o.as_dict() for o in self.options],
            "error": self.error,
        }


def load_object(value: str) -> Any:
    """``module[:attr]`` -> the object (an instance when it is a class), like an entry point's value."""
    module_name, _, attr = value.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj() if inspect.isclass(obj) else obj


def implemented_hooks(obj: Any) -> tuple[str, ...]:
    marker = f"{PROJECT}_impl"
    return tuple(
        name for name in HOOK_NAMES if hasattr(getattr(obj, name, None), marker)
    )


def describe(obj: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
    fn = getattr(obj, "sft_describe", None)
    if fn is None or not hasattr(fn, f"{PROJECT}_impl"):
        return {}
    params = inspect.signature(fn).parameters
    return fn(**({"options": options or {}} if "options" in params else {})) or {}


def option_schema(obj: Any) -> tuple[Option, ...] | None:
    """The plugin's ``sft_options()`` answer, or None when it implements no such hook."""
    fn = getattr(obj, "sft_options", None)
    if fn is None or not hasattr(fn, f"{PROJECT}_impl"):
        return None
    schema = tuple(fn() or ())
    bad = [o for o in schema if not isinstance(o, Option)]
    if bad:
        raise TypeError(f"sft_options must return sft_plugins.Option instances, got {bad[0]!r}")
    return schema


def info_for_object(name: str, obj: Any, *, source: str, distribution: str | None = None,
                    version: str | None = None, value: str = "") -> PluginInfo:
    hooks = implemented_hooks(obj)
    if not hooks:
        return PluginInfo(name, source, distribution, version, value,
                          error=f"{value or obj!r} carries no sft_plugins hookimpls")
    try:
        schema = option_schema(obj)
        desc = describe(obj, option_defaults(schema))
    except Exception as exc:  # a broken third-party plugin must not break the others
        return PluginInfo(name, source, distribution, version, value, hooks, error=f"{type(exc).__name__}: {exc}")
    return PluginInfo(name, source, distribution, version, value, hooks, summary=str(desc.get("summary", "")),
                      loss_parity=desc.get("loss_parity"), quantized=str(desc.get("quantized", "")),
                      options=schema, obj=obj)


def _info_for_entry_point(ep: metadata.EntryPoint) -> PluginInfo:
    dist = ep.dist.name if ep.dist is not None else None
    version = ep.dist.version if ep.dist is not None else None
    builtin = dist is not None and dist.replace("_", "-").lower() == OWN_DISTRIBUTION
    source = "builtin" if builtin else "entry point"
    try:
        obj = load_object(ep.value)
    except Exception as exc:  # a broken third-party plugin must not break the others
        return PluginInfo(ep.name, source, dist, version, ep.value, error=f"{type(exc).__name__}: {exc}")
    return info_for_object(ep.name, obj, source=source, distribution=dist, version=version, value=ep.value)


@functools.lru_cache(maxsize=1)
def _discover() -> dict[str, PluginInfo]:
    found: dict[str, PluginInfo] = {}
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        info = _info_for_entry_point(ep)
        if ep.name in found:
            if found[ep.name].value != info.value or found[ep.name].distribution != info.distribution:
                warnings.warn(f"sft_plugins: plugin name {ep.name!r} is registered twice "
                              f"({found[ep.name].value} and {info.value}); keeping the first", stacklevel=3)
            continue
        if info.error:
            warnings.warn(f"sft_plugins: plugin {ep.name!r} ({info.value}) failed to load: {info.error}",
                          stacklevel=3)
        found[ep.name] = info
    return found


def available() -> dict[str, PluginInfo]:
    """All plugins of the ``sft_plugins`` entry-point group, by name (broken ones carry ``error``)."""
    return dict(_discover())


def refresh() -> None:
    """Forget what was discovered (after installing a plugin package in a running process)."""
    _discover.cache_clear()
    importlib.invalidate_caches()


def resolve(names: list[str], local: dict[str, Any] | None = None) -> list[PluginInfo]:
    """The loaded plugins for ``names``, in order; raises ``PluginError`` for unknown/broken ones."""
    known = available()
    for name, obj in (local or {}).items():
        known[name] = info_for_object(name, obj, source="local", value=getattr(obj, "__name__", repr(obj)))
    if len(set(names)) != len(names):
        raise PluginError(f"a plugin is named twice in {names!r}; name each plugin once")
    resolved = []
    for name in names:
        info = known.get(name)
        if info is None:
            usable = sorted(n for n, i in known.items() if i.ok)
            raise PluginError(f"unknown plugin {name!r}; available plugins: {', '.join(usable) or '(none)'}")
        if info.error:
            raise PluginError(f"plugin {name!r} ({info.value}) cannot be used: {info.error}")
        resolved.append(info)
    return resolved
