"""PiToMe: Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS 2024.

Faithful: a token's energy is the mean over its sequence's tokens of a kernel of its cosine to each,
so tokens in large clusters of alike tokens score high and isolated ones low. Only the 2k
highest-energy tokens are merge candidates, the rest are protected for this step; the candidates
form sets A and B, and every A-token merges into its most similar B-token (size-weighted average,
by the engine). The margin m falls with depth, m = 0.9 - margin_drop * l / L after layer l of L, or
is fixed. The paper (and the authors' vision code) and the authors' text code differ, and each
difference is an option:
  kernel: "elu" (the paper's f_m, as its code computes it): ELU(cos - m), alpha below the margin;
    "gaussian" (the text code): the normal density of 1 - cos with sigma = 1 - m.
  split: "alternate" (the paper): in energy order the candidates alternate into A and B; "halves"
    (the text code): the k highest are A, the next k B.
  margin_drop: 0.9 (the paper) or 0.25 (the text code).
  layers: None reduces at every point; N only after the attention of the first N layers (-N: the
    last N), at a constant share per layer. The text code reduces in the first three layers (its
    ratio list names the last three, but pop() hands them out in reverse): layers=3.
With a fixed margin, each form gives the authors' merge groups and tokens to rounding
(tests/test_authors_token_methods.py).

Deviations: similarity is on the hidden states being reduced, not the attention keys (as for
tokenfuse's ToMe). The text code averages merged tokens plainly without proportional attention;
tokenfuse weighs by size and attends proportionally, as the paper. The reduction after the
embeddings, which neither has, uses the first layer's margin. Energies and matches see only a
sequence's real, non-protected tokens (the text code sets aside [CLS] alone and counts padding).
The exact energy needs every pairwise similarity, O(N^2 * D); by default the mean is estimated over
at most `references` movable tokens spread evenly over each sequence (exact for shorter ones),
O(N * references * D); `references=None` computes it over all tokens, as the paper does.

Why the defaults: the Gaussian kernel stays closer to the full model than ELU on text and vision, the
halves split is the one large loss, and layers=3 cannot reach small budgets (README, "Why the
defaults").
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import Reduction
from ..core import schedule as sched
from .base import LayerInput, Method
from .options import Option
from .registry import register

Kernel = Literal["elu", "gaussian"]  # the energy's kernel: the paper's, or the authors' text code's
Split = Literal["alternate", "halves"]  # how the 2k candidates form A and B


def depth_margin(point: int, num_layers: int, drop: float = 0.9) -> float:
    """The margin 0.9 - drop * l / L for the layer l whose attention precedes `point` (the paper:
    drop 0.9; the authors' text code: 0.25): early only near-duplicates count as neighbours,
    deeper ever looser clusters do."""
    layer = max(point - 1, 0)
    return 0.9 - drop * layer / max(num_layers, 1)


def energy(
    sim: Tensor,
    movable: Tensor,
    margin: float,
    kernel: Kernel,
    alpha: float = 1.0,
    counted: Tensor | None = None,
) -> Tensor:
    """(B, N) energy of each token: the mean over the movable tokens of its own sequence (or over
    the `counted` columns of `sim`, B x N x M, when it holds reference tokens) of a kernel of the
    cosine: ELU(cos - margin) (alpha below the margin), or the Gaussian density of 1 - cos with
    sigma = 1 - margin; -inf for the tokens that are not movable. Consumes `sim` as scratch."""
    counted = movable if counted is None else counted
    if kernel == "elu":
        f = F.elu_(sim.sub_(margin), alpha=alpha)
    else:
        sigma = 1.0 - margin
        f = sim.sub_(1.0).div_(sigma).square_().mul_(-0.5).exp_().div_(sigma * math.sqrt(2 * math.pi))
    f = f.masked_fill_(~counted[:, None, :], 0.0)
    score = f.sum(-1) / counted.sum(-1, keepdim=True).clamp_min(1)
    return score.masked_fill(~movable, -torch.inf)


def references(movable: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Positions (B, M) of up to `count` movable tokens spread evenly over each sequence's own
    movable tokens (all of them when it has no more), and which of the M slots are used."""
    n = movable.sum(-1)
    used = n.clamp(max=count)
    slot = torch.arange(min(count, movable.shape[1]), device=movable.device)
    ok = slot[None, :] < used[:, None]
    rank = torch.where(ok, slot[None, :] * n[:, None] // used.clamp_min(1)[:, None], 0)
    in_order = (~movable).float().argsort(dim=-1, stable=True)  # movable first, by position
    return in_order.gather(1, rank), ok


def layer_schedule(keep: float, num_layers: int, layers: int) -> list[float]:
    """The geometric schedule (every reducing point keeps the same share of its tokens, the work is
    `keep`) with reductions only after the attention of the first `layers` layers, or of the last
    -`layers` when negative; the other points, the embeddings' included, are left alone."""
    if abs(layers) > num_layers:
        raise ValueError(f"layers={layers}, but the model has {num_layers} layers")
    chosen = range(num_layers)[:layers] if layers > 0 else range(num_layers)[layers:]
    points = {layer + 1 for layer in chosen}

    def shape(q: float) -> list[float]:
        return [q ** sum(1 for p in points if p <= point) for point in range(num_layers + 1)]

    if keep == 1.0:
        return shape(1.0)
    if keep < sched.work(shape(0.5)):
        raise ValueError(
            f"keep {keep} is below what reducing in only {len(points)} of {num_layers} layers (layers="
            f"{layers}) can reach, as each point merges at most half its tokens; raise keep or reduce "
            "in more layers"
        )
    _, hi = sched.bracket(lambda q: sched.work(shape(q)), keep, 0.5, 1.0)
    return shape(hi)


@register
class PiToMe(Method):
    name = "pitome"
    paper = "Tran et al., Accelerating Transformers with Spectrum-Preserving Token Merging, NeurIPS 2024"
    needs = frozenset({"hidden"})
    max_removal = 0.5  # one token per A-token of the 2k candidates

    margin: float | None = Option(None, "a fixed margin; None: the depth schedule", "[-1, 1)")
    alpha: float = Option(1.0, "the ELU kernel's scale below the margin", "(0, inf)")
    references: int | None = Option(64, "tokens the energy is estimated over; None: all", "[1, inf)")
    kernel: Kernel = Option("gaussian", "the energy's kernel")
    split: Split = Option("alternate", "how the 2k candidates form A and B")
    margin_drop: float = Option(0.9, "how far the depth schedule's margin falls from 0.9", "[0, 1.9)")
    layers: int | None = Option(None, "reduce after the first N layers (-N: the last N); None: all")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.kernel == "gaussian" and self.alpha != 1.0:
            raise ValueError(
                "alpha is the ELU kernel's scale (kernel='elu'); the gaussian kernel has none, leave it out"
            )
        if self.layers == 0:
            raise ValueError(
                "layers must be a nonzero integer (reduce after the first N layers' attention, or the "
                "last N when negative) or None (every point); got 0"
            )

    def schedule_for(self, num_layers: int) -> list[float]:
        if self.layers is None or self.schedule is not None:
            return super().schedule_for(num_layers)
        return layer_schedule(self.keep, num_layers, self.layers)

    def decide(self, inp: LayerInput) -> Reduction:
        movable = inp.tokens.mask & ~inp.tokens.protected
        metric = F.normalize(inp.x.float(), dim=-1)
        if self.margin is None:
            margin = depth_margin(inp.point, inp.num_layers, self.margin_drop)
        else:
            margin = self.margin
        if self.references is None:
            sim, counted = metric @ metric.transpose(1, 2), None
        else:
            at, counted = references(movable, self.references)
            sim = metric @ metric.gather(1, at[..., None].expand(-1, -1, metric.shape[-1])).transpose(1, 2)
        score = energy(sim, movable, margin, self.kernel, self.alpha, counted)

        # Rank by energy (stable: ties keep token order, whatever the padding); the 2k highest are
        # the candidates: alternating A (ranks 0, 2, ...) and B (ranks 1, 3, ...), or the k highest
        # A and the next k B.
        order = score.argsort(dim=-1, descending=True, stable=True)
        k = torch.minimum(inp.remove, movable.sum(-1) // 2)
        positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
        top = int(k.max())
        if top == 0:
            return Reduction.hard(positions.clone())
        slot = torch.arange(top, device=k.device)
        real = slot < k[:, None]  # pairs beyond a sequence's own k
        if self.split == "alternate":
            a_idx, b_idx = order[:, 0 : 2 * top : 2], order[:, 1 : 2 * top : 2]
        else:
            a_idx = order[:, :top]
            b_idx = order.gather(1, torch.where(real, k[:, None] + slot, 0))

        # Every A-token merges into its most similar B-token.
        rows = metric.gather(1, a_idx[..., None].expand(-1, -1, metric.shape[-1]))
        cols = metric.gather(1, b_idx[..., None].expand(-1, -1, metric.shape[-1]))
        scores = (rows @ cols.transpose(1, 2)).masked_fill_(~real[:, None, :], -torch.inf)
        partner = b_idx.gather(1, scores.argmax(-1))
        dest = positions.scatter(1, a_idx, torch.where(real, partner, a_idx))
        return Reduction.hard(dest)
