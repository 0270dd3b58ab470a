"""What every installed patch offers (text and vision encoders, sentence-transformers, vision-language
models), so that the api, the bench and the corpus jobs read any of them the same way."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from ..core import Tokens

#: the members of `Installed`, for checks that a patch class declares each of them
MEMBERS = ("method", "tokens", "layer_tokens", "kept", "decide_seconds", "overhead_seconds", "remove")


class Installed(Protocol):
    """A patch installed on a model, read for the calling thread's last forward.

    method: what it applies (a vision-language model: its tower method and operators, in stage order).
    tokens: the token state after the last forward (sizes, protected, sources), None before one; a
        patch whose output has no token state (a vision-language model, one output per kept position)
        raises a TypeError that says what to read instead.
    layer_tokens(): (layers, 2, B) tokens entering each layer and after its reduction.
    kept(): per image, the indices of the visual tokens it kept (vision-language models); other
        patches merge tokens rather than keep some, and refuse with a TypeError saying what to read.
    decide_seconds, overhead_seconds: time in the method's decisions, and in every hook (decisions
        included), summed over every forward of every thread.
    remove(): every hook taken away; the model computes exactly as before.
    """

    method: Any
    decide_seconds: float
    overhead_seconds: float

    @property
    def tokens(self) -> Tokens | None: ...

    def layer_tokens(self) -> Tensor: ...

    def kept(self) -> list[Tensor]: ...

    def remove(self) -> None: ...


def no_kept(kind: str) -> TypeError:
    """The refusal of `kept()` on a patch that merges tokens: what to read instead."""
    return TypeError(
        f"kept() reads which visual tokens each image of a vision-language model kept; a {kind} merges "
        "tokens rather than keeping some: read tokenfuse.token_sizes(model) (inputs per output token), "
        "or apply the method with track_source=True and map outputs back with tokenfuse.to_grid"
    )
