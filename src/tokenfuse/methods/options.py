"""A method's options, declared once: each is a class attribute annotated with its type (typing.Literal
for a choice, as timm does) whose value is an `Option` (default, range, one line on what it does).
`options()`, `tokenfuse methods`, configuration files and the checks of given values all read this
declaration, so a new option is one line.

    class ToMe(Method):
        order: Literal["original", "reference"] = Option("original", "token layout after a merge")
"""

from __future__ import annotations

import functools
import math
import types
import typing
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..core.messages import did_you_mean


@dataclass(frozen=True)
class Option:
    """default: the value when none is given. doc: what the option sets, a few words. within: the
    allowed interval for numbers, "[0, 1)" style (inf allowed); None: any. decides: False for
    options that change no decision (tracking sources, static layout), which may be added to a
    calibrated configuration."""

    default: Any
    doc: str
    within: str | None = None
    decides: bool = True

    def but(self, default: Any) -> Option:
        """The same option with another default (a subclass's own)."""
        return replace(self, default=default)


@dataclass(frozen=True)
class Declared:
    """One option as a class declares it: its name, resolved type and `Option`."""

    name: str
    kind: Any
    spec: Option

    @property
    def type_name(self) -> str:
        return shown(self.kind)


@functools.cache
def declared(cls: type) -> dict[str, Declared]:
    """The options of a method class by name, base classes' first; a subclass re-declares one to
    change its default, or sets the name to something else than an `Option` to drop it."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Declared] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, Option):
                out[name] = Declared(name, hints[name], value)  # a re-declared one keeps its place
            elif name in out:
                del out[name]
    return out


def shown(kind: Any) -> str:
    """A type as `tokenfuse methods` shows it: 'hidden' | 'keys', float | None, tuple[int, int]."""
    if typing.get_origin(kind) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(kind))
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " | ".join(shown(a) for a in typing.get_args(kind))
    if kind is type(None):
        return "None"
    if isinstance(kind, type) and not typing.get_args(kind):
        return kind.__name__
    return str(kind).replace("typing.", "").replace("collections.abc.", "")


def resolve(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """Every declared option's value: the given one, checked against its type and range, or the
    default. An unknown name is a TypeError naming the options there are."""
    options = declared(cls)
    for key in given:
        if key not in options:
            raise TypeError(
                f"{cls.name} has no option {key!r}{did_you_mean(key, options)}; its options: "
                f"{', '.join(options)}"
            )
    return {
        name: check(cls.name, d, given[name]) if name in given else d.spec.default
        for name, d in options.items()
    }


def check(method: str, option: Declared, value: Any) -> Any:
    """The value, as its declared type holds it (an int given for a float is a float), or a ValueError
    naming the option, what it sets, what it takes, and what was given."""
    kinds = (
        typing.get_args(option.kind)
        if typing.get_origin(option.kind) in (typing.Union, types.UnionType)
        else (option.kind,)
    )
    if value is None and type(None) in kinds:
        return None
    for kind in kinds:
        fits = _fits(kind, value)
        if fits is not None and _inside(option.spec.within, fits):
            return fits
    takes = " or ".join(_what(k, option.spec.within) for k in kinds)
    raise ValueError(f"{method}: {option.name} must be {takes} ({option.spec.doc}), got {value!r}")


def _fits(kind: Any, value: Any) -> Any:
    """The value as `kind` holds it, or None where it is not one."""
    if typing.get_origin(kind) is Literal:
        return value if isinstance(value, str) and value in typing.get_args(kind) else None
    if kind is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool) or kind is type(None):
        return None
    if kind is int:
        return value if isinstance(value, int) else None
    if kind is float:
        return float(value) if isinstance(value, int | float) and not math.isnan(value) else None
    if typing.get_origin(kind) is tuple:
        return tuple(value) if isinstance(value, list | tuple) else None
    return value  # a sequence (a schedule): its method checks it


def _inside(within: str | None, value: Any) -> bool:
    if within is None or not isinstance(value, int | float):
        return True
    low, high = (float(end) for end in within[1:-1].split(","))
    above = value >= low if within[0] == "[" else value > low
    below = value <= high if within[-1] == "]" else value < high
    return above and below


def _what(kind: Any, within: str | None) -> str:
    if typing.get_origin(kind) is Literal:
        return f"one of {shown(kind)}"
    if kind is type(None):
        return "None"
    if kind is bool:
        return "true or false"
    noun = {int: "a whole number", float: "a number"}.get(kind, shown(kind))
    if within is None:
        return noun
    if within.endswith("inf)"):
        return f"{noun} {'>=' if within[0] == '[' else '>'} {within[1:].split(',')[0]}"
    return f"{noun} in {within}"
