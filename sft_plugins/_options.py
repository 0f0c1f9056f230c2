"""Plugin options: one declarative schema per plugin, validated by the core when a stack is composed.

A plugin answers ``sft_options()`` with a list of :class:`Option`; ``compose()`` rejects unknown names and
bad values (all at once, each naming what is allowed) before any model is touched, and every hook then
receives the plugin's options with the defaults filled in. ``sft-plugins info NAME`` prints the same
schema. A plugin without ``sft_options`` gets its options unchecked, as given.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import PluginError


@dataclass(frozen=True)
class Option:
    """One option of a plugin.

    A value is accepted when it is one of ``choices``, or an instance of ``type`` (``bool`` is never taken
    for an ``int`` or ``float``) at least ``minimum``, or None where ``nullable``; ``check`` may add a
    last test returning an error message. ``type=None`` with ``choices`` means the choices only.
    """

    name: str
    default: Any
    doc: str
    type: type | tuple[type, ...] | None = None
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None

    def _types(self) -> tuple[type, ...]:
        if self.type is None:
            return ()
        return self.type if isinstance(self.type, tuple) else (self.type,)

    def kind(self) -> str:
        """The accepted values in words, e.g. ``int >= 0 | "auto"``."""
        parts = []
        for t in self._types():
            name = t.__name__
            parts.append(f"{name} >= {self.minimum:g}" if self.minimum is not None and t in (int, float) else name)
        parts += [repr(c) for c in self.choices]
        if self.nullable:
            parts.append("None")
        return " | ".join(parts) or "any"

    def error(self, value: Any) -> str | None:
        """Why ``value`` is not accepted, or None."""
        if value is None and self.nullable:
            return None
        if any(value == c and type(value) is type(c) for c in self.choices):
            return None
        types = self._types()
        if isinstance(value, bool):
            ok = bool in types
        else:
            ok = isinstance(value, types) or (float in types and isinstance(value, int))
        if ok and self.minimum is not None and isinstance(value, (int, float)) and value < self.minimum:
            ok = False
        if not ok:
            return f"option {self.name!r} must be {self.kind()}, got {value!r}"
        return self.check(value) if self.check is not None else None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.kind(), "default": self.default, "doc": self.doc}


def option_defaults(schema: Sequence[Option] | None) -> dict[str, Any]:
    """``{name: default}`` of a schema (empty for None)."""
    return {o.name: o.default for o in schema or ()}


def validate_options(plugin: str, schema: Sequence[Option] | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """The plugin's options with defaults filled in; raises :class:`PluginError` listing every problem."""
    if schema is None:
        return dict(given)
    by_name = {o.name: o for o in schema}
    errors = []
    for key in given:
        if key not in by_name:
            close = difflib.get_close_matches(str(key), list(by_name), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"unknown option {key!r}{hint}; {plugin} takes {sorted(by_name) or 'no options'}")
    for key, value in given.items():
        if key in by_name and (msg := by_name[key].error(value)) is not None:
            errors.append(msg)
    if errors:
        raise PluginError(f"bad options for {plugin}:\n  " + "\n  ".join(errors))
    return {**option_defaults(schema), **given}
