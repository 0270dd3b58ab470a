"""The per-point engine every token-method adapter shares: one forward's token state (`Forward`),
the budget turned into per-row counts at each reduction point and the method's decision applied
there (`Patch.reduce_at`), the attention mask handed to reduced layers, and the captured q, k, v.

An adapter only wires these steps to a model's modules with hooks (`hooks`); it never replaces a
forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core import Tokens, attention_bias, reduce
from ..core.tokens import take_along
from ..methods import LayerInput, Method
from .hooks import Hooks
from .protocol import no_kept


@dataclass(eq=False)
class Forward:
    """The state of one forward pass, seen by that pass's hooks only.

    tokens: the token state after the latest reduction; None until the pass knows its padding.
    n0: (B,) real tokens at the start, the base of the schedule's fractions. width: the padded
    length at the start, the base of static mode's widths.
    trace: per layer, (tokens entering it, tokens after its reduction), for the work accounting.
    qkv: the current layer's per-head q, k, v (B, H, N, D), until a reduction point consumes them.
    reduced: whether tokens were reduced (from then on layers attend with the engine's mask).
    grid: (h, w) the input image's patch grid (vision adapters, for methods that need it).
    entering: the token state entering each layer, kept where sources are tracked (so that each
    layer's hidden states can be mapped back to the grid).
    """

    tokens: Tokens | None = None
    n0: Tensor | None = None
    width: int = 0
    trace: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    qkv: dict[str, Tensor] = field(default_factory=dict)
    reduced: bool = False
    grid: tuple[int, int] | None = None
    entering: list[Tokens] = field(default_factory=list)


class Patch(Hooks):
    """Token reduction installed in one transformer's layers. tokens, trace, layer_tokens(): the
    calling thread's last forward. default_min_tokens: the floor a method's `min_tokens=None`
    means on this kind of model (`reduce_at`)."""

    state_type = Forward
    default_min_tokens: ClassVar[int] = 0
    #: whether the adapter gives methods the image's patch grid (`LayerInput.grid`)
    has_grid: ClassVar[bool] = False
    #: whether every pass tracks sources, whatever the method says (dense backbones: feature maps are grids)
    tracks_source: bool = False

    def __init__(self, model: nn.Module, method: Method, num_layers: int, num_heads: int, has_cls: bool):
        super().__init__()
        if "grid" in method.needs and not self.has_grid:
            raise ValueError(
                f"{method.name} works on an image's patch grid, and {type(model).__name__} reads no image: "
                "choose a method that does not need one (see `tokenfuse methods`)"
            )
        self.model = model
        self.method = method
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.has_cls = has_cls
        self.schedule = method.schedule_for(num_layers)
        # hooks that read counts back (the default mode's, when they reduce) run outside compiled graphs
        self.traced = method.static or min(self.schedule) >= 1.0
        self.wants_attention = bool(method.needs & method.ATTENTION_INPUTS)
        self.tracks_origin = False  # set by adapters whose host reads positions after the embeddings
        #: how many tokens every sequence protects, known before any input (static mode's margin)
        self.fixed_protected = 0
        self.min_tokens = self.default_min_tokens if method.min_tokens is None else method.min_tokens

    @property
    def tokens(self) -> Tokens | None:
        """Token state after this thread's last forward; None before one."""
        return None if self.last is None else self.last.tokens

    @property
    def trace(self) -> list[tuple[Tensor, Tensor]]:
        return [] if self.last is None else self.last.trace

    def layer_tokens(self) -> Tensor:
        """(L, 2, B) this thread's last forward: tokens entering each layer and after its reduction."""
        return torch.stack([torch.stack(pair) for pair in self.trace])

    def kept(self) -> list[Tensor]:
        raise no_kept("token method")

    def begin(self, fwd: Forward, mask: Tensor, protected: Tensor) -> None:
        """The pass knows its padding: every real token stands for itself."""
        fwd.tokens = Tokens.start(
            mask,
            protected,
            track_source=self.method.track_source or self.tracks_source,
            track_origin=self.tracks_origin,
        )
        fwd.n0 = fwd.tokens.count
        fwd.width = mask.shape[1]

    def enter(self, fwd: Forward, dtype: torch.dtype) -> Tensor | None:
        """A layer starts: the engine's attention mask once tokens were reduced, else None (the
        host's own mask, untouched, so that keep 1.0 is bit-identical)."""
        fwd.trace.append((fwd.tokens.count, fwd.tokens.count))
        if fwd.tokens.source is not None:
            fwd.entering.append(fwd.tokens)
        if not fwd.reduced:
            return None
        return attention_bias(fwd.tokens, dtype, self.method.prop_attn)

    def _keep(self, name: str, module: nn.Module, args: tuple, out: Tensor) -> None:
        """Forward hook for a projection: keep its per-head output as q, k or v ("qkv": fused)."""
        fwd = self.current()
        if fwd is None:
            return
        B, N, _ = out.shape
        heads = out.view(B, N, -1, self.num_heads, out.shape[-1] // self.num_heads // len(name))
        for i, part in enumerate(name):
            fwd.qkv[part] = heads[:, :, i].transpose(1, 2)

    def reduce_at(self, fwd: Forward, point: int, x: Tensor) -> Tensor | None:
        """Let the method decide at reduction point `point` and apply it; None if nothing to do.

        Each sequence keeps the schedule's fraction of its starting tokens, but never fewer than
        `min_tokens` (all of its tokens if it has fewer) nor than its protected ones.

        Static mode (`Method.static`) reads nothing back from the tensors: each point runs, and the
        reduced width is ceil(starting width * fraction), which holds every sequence's target, plus
        the protected tokens (a method may fall short of a target by those it must leave alone,
        on very short sequences: [CLS] x [SEP] cannot be merged further), or min_tokens if more,
        at most the starting width (fractions do not increase, so neither do the widths). A
        sequence that still does not fit stops with an error on the device (`core.reduce`)."""
        fraction = self.schedule[point]
        if fraction >= 1.0:
            return None
        static = self.method.static
        tokens = fwd.tokens
        floor = torch.maximum(tokens.protected.sum(-1), fwd.n0.clamp_max(self.min_tokens))
        target = torch.maximum(torch.ceil(fwd.n0 * fraction).long(), floor)
        remove = (tokens.count - target).clamp_min(0)
        if not static and not bool(remove.any()):
            return None
        # from the starting width alone (never from the current one): widths stay one expression
        # of it deep, which torch.compile's dynamic shapes simplify quickly
        width = None
        if static:
            width = min(
                fwd.width, max(math.ceil(fwd.width * fraction) + self.fixed_protected, self.min_tokens)
            )
        qkv = fwd.qkv
        if not fwd.reduced:
            x, tokens, qkv = right_padded(x, tokens, qkv, always=static)
        inp = LayerInput(
            point=point,
            x=x,
            tokens=tokens,
            remove=remove,
            num_layers=self.num_layers,
            prop_attn=self.method.prop_attn,
            has_cls=self.has_cls,
            grid=None if fwd.reduced else fwd.grid,
            **qkv,
        )
        fwd.qkv = {}
        red = self.timed(self.method.decide, inp)
        x, fwd.tokens = reduce(x, tokens, red, width)
        fwd.reduced = True
        if point > 0:
            fwd.trace[-1] = (fwd.trace[-1][0], fwd.tokens.count)
        return x


def right_padded(
    x: Tensor, tokens: Tokens, qkv: dict[str, Tensor], always: bool = False
) -> tuple[Tensor, Tokens, dict[str, Tensor]]:
    """A left-padded batch laid out as a right-padded one: the real tokens of each sequence moved,
    in order, ahead of its padding, in the features (B, N, C), the token state and the captured
    q, k, v (B, H, N, D). Methods then see every sequence as it would be alone (ToMe's split reads
    positions). Exact (a gather); nothing before the first reduction depends on where padding sits,
    since the host's layers see positions only through their embeddings and the mask. always: move
    them without first reading whether any row is left-padded (static mode; a right-padded batch
    stays as it is)."""
    mask = tokens.mask
    if not always and not left_padded(mask):
        return x, tokens, qkv
    order = ahead(mask)
    return (
        take_along(x, order),
        tokens.take(order),
        {name: take_along(t, order, 2) for name, t in qkv.items()},
    )


def left_padded(mask: Tensor) -> bool:
    """Whether a row of the padding mask (B, N) has a real token after padding (one host sync)."""
    return bool((mask[:, 1:] & ~mask[:, :-1]).any())


def ahead(chosen: Tensor) -> Tensor:
    """(B, N) per row, the permutation that puts the chosen positions first, each group in its order."""
    return (~chosen).to(torch.uint8).argsort(dim=-1, stable=True)


def check_attention(model: nn.Module) -> None:
    """Hugging Face models: the engine's mask works with the sdpa and eager attention only."""
    impl = getattr(model.config, "_attn_implementation", "eager")
    if impl not in ("eager", "sdpa"):
        raise ValueError(
            f"tokenfuse needs the 'sdpa' or 'eager' attention implementation, the model uses {impl!r}; "
            "load it with attn_implementation='sdpa'"
        )


def pairs_at(t: Tensor, index: Tensor) -> Tensor:
    """(B|1, H, N, N) a per-position-pair tensor (attention mask, position bias), (B, M) positions
    -> (B, H, M, M) its entries between those positions, row and column."""
    B, M = index.shape
    H = t.shape[1]
    rows = t.expand(B, -1, -1, -1).gather(2, index[:, None, :, None].expand(-1, H, -1, t.shape[3]))
    return rows.gather(3, index[:, None, None, :].expand(-1, H, M, -1))
