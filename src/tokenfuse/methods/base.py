"""What a method is: a rule that, given one layer's tokens, decides a `Reduction`. Nothing more."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .. import schedule as sched
from ..engine import Reduction, Tokens


@dataclass(frozen=True)
class LayerInput:
    """What a method sees at one reduction point (tokenfuse.schedule): after the embeddings
    (point 0), or between layer l's attention and its MLP (point l + 1).

    x: (B, N, C) hidden states about to be reduced. keys: (B, N, D) the layer's attention keys
    averaged over heads (only when the method needs them; never at point 0). remove: (B,) how many
    tokens each sequence should lose here; a method may remove fewer (bipartite matching caps at
    about half).
    """

    point: int
    x: Tensor
    tokens: Tokens
    remove: Tensor
    keys: Tensor | None = None


class Method:
    """Base class. Subclasses set `name`, `paper`, `needs` and implement `decide`."""

    name: ClassVar[str]
    paper: ClassVar[str]
    #: the inputs `decide` reads: "hidden" (the states being reduced), "keys" (attention keys)
    needs: frozenset[str] = frozenset()
    #: inputs that exist only after a layer's attention, so not at the embeddings
    ATTENTION_INPUTS = frozenset({"keys"})

    def __init__(
        self,
        keep: float = 0.5,
        schedule: Sequence[float] | None = None,
        prop_attn: bool = True,
        track_source: bool = False,
    ) -> None:
        self.keep = sched.check_keep(keep)
        self.schedule = None if schedule is None else [float(f) for f in schedule]
        self.prop_attn = prop_attn
        self.track_source = track_source

    def schedule_for(self, num_layers: int) -> list[float]:
        """Fraction of original tokens left after each of the num_layers + 1 reduction points."""
        if self.schedule is not None:
            return sched.check_schedule(self.schedule, num_layers)
        at_embeddings = not (self.needs & self.ATTENTION_INPUTS)
        return sched.geometric(self.keep, num_layers, at_embeddings=at_embeddings)

    def decide(self, inp: LayerInput) -> Reduction:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The settings that define this method instance (recorded in results)."""
        return {"keep": self.keep, "schedule": self.schedule, "prop_attn": self.prop_attn}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items() if v is not None)
        return f"{type(self).__name__}({opts})"
