"""Methods by name. Researchers add their own with `@register` from their code, no edits here.

Two kinds share the decorator: token methods (`Method`, applied in a transformer's layers) and
visual-token operators (`VisualMethod`, applied to a vision-language model's image tokens). Each kind
has its own names, so a baseline such as "pool" exists in both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar, overload

from ..core.messages import did_you_mean
from .base import Method
from .vlm.base import VisualMethod

Kind = Literal["token", "visual"]
_METHODS: dict[Kind, dict[str, type]] = {"token": {}, "visual": {}}

M = TypeVar("M", bound=type)


def kind_of(cls: type) -> Kind:
    if isinstance(cls, type) and issubclass(cls, Method):
        return "token"
    if isinstance(cls, type) and issubclass(cls, VisualMethod):
        return "visual"
    raise TypeError(f"register expects a subclass of tokenfuse.Method or VisualMethod, got {cls!r}")


@overload
def register(cls: M, *, replace: bool = False) -> M: ...
@overload
def register(cls: None = None, *, replace: bool = False) -> Callable[[M], M]: ...
def register(cls: M | None = None, *, replace: bool = False) -> M | Callable[[M], M]:
    """Class decorator: make a Method (or VisualMethod) subclass available by its `name`. A name
    already taken in its kind is an error, so that a method is never replaced by accident;
    `@register(replace=True)` (or `register(cls, replace=True)`) replaces it on purpose."""
    if cls is None:
        return lambda cls: register(cls, replace=replace)
    names = _METHODS[kind_of(cls)]
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name`, the name it is made by")
    taken = names.get(name)
    if taken is not None and taken is not cls and not replace:
        raise ValueError(
            f"a method named {name!r} is already registered ({taken.__module__}.{taken.__qualname__}); "
            "give yours another `name`, or replace it on purpose with @register(replace=True)"
        )
    names[name] = cls
    return cls


def available(kind: Kind = "token") -> dict[str, type]:
    """The registered classes by name, sorted: token methods (kind "token", for `apply(model, name)`),
    or the visual-token operators of vision-language models (`available("visual")`). `tokenfuse
    methods` lists both with their papers and options; `tokenfuse methods --visual` the operators."""
    if kind not in _METHODS:
        raise ValueError(f"kind must be 'token' (methods) or 'visual' (visual-token operators), got {kind!r}")
    return dict(sorted(_METHODS[kind].items()))


def make(method: str | Method | VisualMethod, kind: Kind = "token", **options: Any) -> Any:
    """A method instance of `kind` from a name and options, or the given instance unchanged."""
    if isinstance(method, Method | VisualMethod):
        if kind_of(type(method)) != kind:
            wanted = "a token method (tokenfuse.Method)" if kind == "token" else "a visual-token operator"
            raise TypeError(f"{method!r} is not {wanted}")
        if options:
            raise ValueError(
                f"options {sorted(options)} were given beside a method object; set them on the object instead"
            )
        return method
    names = _METHODS[kind]
    if method not in names:
        what = "method" if kind == "token" else "visual-token operator"
        hint = did_you_mean(method, names)
        raise ValueError(f"unknown {what} {method!r}{hint}; choose one of: {', '.join(sorted(names))}")
    try:
        return names[method](**options)
    except TypeError as err:
        raise TypeError(f"{method}: {err}; `tokenfuse methods` lists each method's options") from err
