"""Methods by name. Researchers add their own with `@register` from their code, no edits here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from .base import Method

_METHODS: dict[str, type[Method]] = {}

M = TypeVar("M", bound=type[Method])


@overload
def register(cls: M, *, replace: bool = False) -> M: ...
@overload
def register(cls: None = None, *, replace: bool = False) -> Callable[[M], M]: ...
def register(cls: M | None = None, *, replace: bool = False) -> M | Callable[[M], M]:
    """Class decorator: make a Method subclass available by its `name`. A name already taken is
    an error, so that a method is never replaced by accident; `@register(replace=True)` (or
    `register(cls, replace=True)`) replaces it on purpose."""
    if cls is None:
        return lambda cls: register(cls, replace=replace)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register expects a subclass of tokenfuse.Method, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name`, the name it is made by")
    taken = _METHODS.get(name)
    if taken is not None and taken is not cls and not replace:
        raise ValueError(
            f"a method named {name!r} is already registered ({taken.__module__}.{taken.__qualname__}); "
            "give yours another `name`, or replace it on purpose with @register(replace=True)"
        )
    _METHODS[name] = cls
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
