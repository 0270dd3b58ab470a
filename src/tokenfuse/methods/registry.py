"""Methods by name. Researchers add their own with `@register` from their code, no edits here."""

from __future__ import annotations

from typing import Any

from .base import Method

_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a Method subclass available by its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register expects a subclass of tokenfuse.Method, got {cls!r}")
    _METHODS[cls.name] = cls
    return cls


def available() -> dict[str, type[Method]]:
    return dict(sorted(_METHODS.items()))


def make(method: str | Method, **options: Any) -> Method:
    """A method instance from a name and options, or the given instance unchanged."""
    if isinstance(method, Method):
        if options:
            raise ValueError(
                f"options {sorted(options)} were given beside a method object; set them on the object instead"
            )
        return method
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(_METHODS))}")
    try:
        return _METHODS[method](**options)
    except TypeError as err:
        raise TypeError(f"{method}: {err}; `tokenfuse methods` lists each method's options") from err
