"""What a visual-token operator is: a rule that, given a batch of visual tokens at one placement of a
vision-language model, decides a `Reduction` (the same format, and the same engine, as every token
method). The VLM adapter (tokenfuse.adapters.vlm) gathers what the operator scores with, applies the
reduction and rebuilds the sequence around it.

Placements:
- "boundary": once per image, between the vision tower and the projector. The tokens are the tower's
  selected features (pre-projector, so the projector runs on fewer tokens and merges happen in the
  encoder's feature space, where VisionZip, VTC-CLS and ToDRE define them).
- "llm": inside the language model, before decoder layer `layer` (after layer - 1), on whole
  sequences whose text tokens are protected; scored with that layer's rotary-embedded queries and keys,
  computed for the needed rows only, so the host's SDPA attention stays on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ...core import Reduction, Tokens
from ...core.matching import ranks
from ..options import Option, declared, resolve

Placement = Literal["boundary", "llm"]


@dataclass(frozen=True)
class VisualInput:
    """What an operator sees at its placement.

    x: (B, N, C) the tokens about to be reduced: B images' tower features (boundary) or B sequences'
        hidden states entering LLM layer `layer`.
    tokens: their sizes (0 = padding) and protected set (every non-visual token).
    visual: (B, N) the visual tokens (at the boundary, every real token).
    keep: (B,) how many visual tokens each row keeps.
    grid: (h, w) the patch grid of each image at the boundary, while it is whole; None otherwise.
    layer: the LLM layer the reduced sequence enters next; None at the boundary.
    The rest is present only when the operator's `needs` names it:
    cls_attention: (B, N) the tower's [CLS] attention to each token at the selected layer, mean over
        heads, softmax over [CLS] and the patches, [CLS] column dropped; None where the tower has no
        [CLS] and the operator brings a substitute (`cls_substitute`).
    cls_attention_layers: (B, Lt, N) the same at every tower layer (Lt layers, input to output).
    keys: (B, N, D) the selected tower layer's keys, mean over heads.
    projected: (B, N, C') the features after the projector (the LLM's input space).
    question: (B, Q, C') input embeddings of each row's question tokens; question_mask (B, Q).
    views: (B, N) the view of its image each token comes from, for images made of several (AnyRes:
        0 the base view, 1 + r x columns + c the crop at tile row r, column c; -1 padding); None
        where every image is one view.
    text_attention: (B, Q, N) in the LLM: each question token's attention to every token, mean over
        heads; rows padded where question_mask is False.
    last_attention: (B, N) in the LLM: the last prompt token's attention to every token (FastV).
    """

    x: Tensor
    tokens: Tokens
    visual: Tensor
    keep: Tensor
    grid: tuple[int, int] | None = None
    layer: int | None = None
    cls_attention: Tensor | None = None
    cls_attention_layers: Tensor | None = None
    keys: Tensor | None = None
    projected: Tensor | None = None
    question: Tensor | None = None
    question_mask: Tensor | None = None
    views: Tensor | None = None
    text_attention: Tensor | None = None
    last_attention: Tensor | None = None


class VisualMethod:
    """Base class. Subclasses set `name`, `paper`, `placement`, `needs` and implement `decide`."""

    name: ClassVar[str]
    paper: ClassVar[str]
    placement: ClassVar[Placement]
    #: inputs `decide` reads (fields of VisualInput), computed only when named
    needs: frozenset[str] = frozenset()
    #: True for operators that drop tokens rather than merge them
    prunes: ClassVar[bool] = False
    #: True for operators that read cls_attention where the tower has a [CLS] and score otherwise where
    #: it has none (they get cls_attention None there), instead of being refused
    cls_substitute: ClassVar[bool] = False
    BOUNDARY_INPUTS = frozenset(
        {"cls_attention", "cls_attention_layers", "keys", "projected", "question", "views"}
    )
    LLM_INPUTS = frozenset({"text_attention", "last_attention"})

    keep: float = Option(0.25, "the fraction of each image's visual tokens kept", "(0, 1]")

    def __init__(self, **options: Any) -> None:
        """Options as declared (`tokenfuse methods --visual`): keep, and for an operator in the LLM
        `layer`, the decoder layer the reduced sequence enters (reduction happens after layer - 1,
        so layers 0..layer-1 see every token)."""
        if self.placement == "boundary" and "layer" in options:
            raise ValueError(f"{self.name} reduces at the vision-to-LLM boundary and takes no layer")
        for name, value in resolve(type(self), options).items():
            setattr(self, name, value)
        self.layer: int | None = getattr(self, "layer", None)
        wrong = self.needs - (self.BOUNDARY_INPUTS if self.placement == "boundary" else self.LLM_INPUTS)
        if wrong:
            raise TypeError(f"{self.name}: a {self.placement} operator cannot read {sorted(wrong)}")

    def stages(self) -> list[tuple[int, float]]:
        """(LLM layer entered reduced, fraction of the visual tokens kept from there on), in layer order:
        one stage unless the operator prunes progressively. Boundary operators: no stages."""
        return [] if self.placement == "boundary" else [(self.layer, self.keep)]

    def counts(self, visual: Tensor, fraction: float | None = None) -> Tensor:
        """(B,) visual tokens to keep per row from (B,) visual counts: ceil(fraction x count), at least
        one where a row has any (LLaVA's 576 -> 64 is keep 0.111...)."""
        fraction = self.keep if fraction is None else fraction
        kept = torch.ceil(visual.double() * fraction - 1e-9).long()
        return torch.where(visual > 0, kept.clamp_min(1), 0)

    def check(self, tower_layers: int) -> None:
        """Refuse, when the operator is installed, settings this model cannot take; `tower_layers`:
        the tower's layers up to the selected one."""

    def pixels(self, pixel_values: Tensor, patch: int) -> Tensor | None:
        """Operators that change the image (the `resize` baseline) return new pixel values; None keeps
        them."""
        return None

    def decide(self, inp: VisualInput) -> Reduction:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """Every declared option's value (recorded in results)."""
        return {name: getattr(self, name) for name in declared(type(self))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"


def top_keep(score: Tensor, inp: VisualInput) -> Tensor:
    """(B, N) bool: each row's `inp.keep` visual tokens of highest score (ties to the earlier token);
    non-visual tokens are never chosen."""
    return top_count(score, inp.visual, inp.keep)


def top_count(score: Tensor, allowed: Tensor, count: Tensor) -> Tensor:
    """(B, N) bool: each row's `count` (B,) allowed (B, N) tokens of highest score, ties to the
    earlier token; fewer where a row allows fewer."""
    _, rank = ranks(score.masked_fill(~allowed, -math.inf), descending=True)
    return (rank < count[:, None]) & allowed


def question_attention(inp: VisualInput, rows: Tensor | None = None) -> Tensor:
    """(B, N) the mean attention of each row's question tokens (only the `rows` (B, Q) of them, when
    given) to every token, from `inp.text_attention` (B, Q, N). A row that must lose visual tokens
    but has no question token to score them is an error, not a silent tie."""
    if inp.text_attention is None or inp.question_mask is None:
        raise ValueError(
            "question_attention needs text_attention and question_mask: name text_attention in needs"
        )
    valid = inp.question_mask if rows is None else inp.question_mask & rows
    raters = valid.sum(1)
    if bool(((raters == 0) & (inp.keep < inp.visual.sum(1))).any()):
        raise ValueError(
            "a sequence with visual tokens to reduce has no question token to score them by; "
            "give each image a question (the text after the image), or use a question-free operator"
        )
    total = (inp.text_attention * valid[..., None]).sum(1)
    return total / raters.clamp_min(1)[:, None]


def prune_to(chosen: Tensor, inp: VisualInput) -> Reduction:
    """The reduction that keeps the chosen visual tokens and every non-visual one, dropping the rest."""
    own = torch.arange(chosen.shape[1], device=chosen.device).expand_as(chosen)
    return Reduction.hard(torch.where(chosen | ~inp.visual, own, -1))


def merge_into(chosen: Tensor, target: Tensor, inp: VisualInput) -> Reduction:
    """Keep the chosen tokens; every other visual token merges whole into `target` (B, N), the index of
    a chosen token (-1 drops it). Non-visual tokens stay."""
    own = torch.arange(chosen.shape[1], device=chosen.device).expand_as(chosen)
    return Reduction.hard(torch.where(chosen | ~inp.visual, own, torch.where(inp.visual, target, -1)))


def fraction_grid(count: int) -> tuple[int, int]:
    """(h, w) with h x w = count, as square as possible (72 -> 8 x 9): the grid the pool and resize
    baselines reduce a square patch grid to."""
    h = math.isqrt(count)
    while count % h:
        h -= 1
    return h, count // h
