"""PiToMe: Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS 2024.

Faithful: a token's energy is the mean over its sequence's tokens of ELU(cos - m) (the reference
code's form of the paper's f_m, alpha = 1), so tokens in large clusters of alike tokens score high
and isolated ones low. Only the 2k highest-energy tokens are merge candidates, the rest are
protected for this step; in energy order the candidates alternate into sets A and B, and every
A-token merges into its most similar B-token (size-weighted average, by the engine). The margin
falls with depth, m = 0.9 - 0.9 * l / L after layer l of L (the paper's schedule), or is fixed.
Deviations: similarity is on the hidden states being reduced, not the attention keys (as for
tokenfuse's ToMe, whose key matching does much worse on a mean-pooled text encoder); the
reduction after the embeddings, which the paper does not have, uses the first layer's margin;
energies and matches see only a sequence's real, non-protected tokens ([CLS]/[SEP] are kept
apart instead of the paper's [CLS] alone). The exact energy needs every pairwise similarity,
O(N^2 * D), four times ToMe's matching, which on CPU ate the savings at small budgets (PiToMe
reached 0.81 of truncation's speedup at keep 0.35); so by default the mean is estimated over at
most `references` = 64 movable tokens spread evenly over each sequence (exact for shorter ones),
O(N * 64 * D). `references=None` computes it over all tokens, as the paper does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import Reduction
from .base import LayerInput, Method
from .registry import register


def depth_margin(point: int, num_layers: int) -> float:
    """The paper's margin 0.9 - 0.9 * l / L for the layer l whose attention precedes `point`: early
    only near-duplicates count as neighbours, deeper ever looser clusters do."""
    layer = max(point - 1, 0)
    return 0.9 - 0.9 * layer / max(num_layers, 1)


def energy(
    sim: Tensor, movable: Tensor, margin: float, alpha: float = 1.0, counted: Tensor | None = None
) -> Tensor:
    """(B, N) energy of each token: mean of ELU(cos - margin) over the movable tokens of its own
    sequence (or over the `counted` columns of `sim`, B x N x M, when it holds reference tokens);
    -inf for the tokens that are not movable. Consumes `sim` as scratch."""
    counted = movable if counted is None else counted
    f = F.elu_(sim.sub_(margin), alpha=alpha).masked_fill_(~counted[:, None, :], 0.0)
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


@register
class PiToMe(Method):
    name = "pitome"
    paper = "Tran et al., Accelerating Transformers with Spectrum-Preserving Token Merging, NeurIPS 2024"
    needs = frozenset({"hidden"})
    max_removal = 0.5  # one token per A-token of the 2k candidates

    def __init__(
        self, margin: float | None = None, alpha: float = 1.0, references: int | None = 64, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if margin is not None and (
            isinstance(margin, bool) or not isinstance(margin, int | float) or not -1.0 <= margin < 1.0
        ):
            raise ValueError(
                "margin must be a cosine similarity in [-1, 1), or None for the paper's depth "
                f"schedule; got {margin!r}"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
            raise ValueError(
                f"alpha (the ELU scale below the margin) must be a positive number, got {alpha!r}"
            )
        if references is not None and (
            isinstance(references, bool) or not isinstance(references, int) or references < 1
        ):
            raise ValueError(f"references must be a positive integer or None (all), got {references!r}")
        self.margin = None if margin is None else float(margin)
        self.alpha = float(alpha)
        self.references = references

    def decide(self, inp: LayerInput) -> Reduction:
        movable = inp.tokens.mask & ~inp.tokens.protected
        metric = F.normalize(inp.x.float(), dim=-1)
        margin = depth_margin(inp.point, inp.num_layers) if self.margin is None else self.margin
        if self.references is None:
            score = energy(metric @ metric.transpose(1, 2), movable, margin, self.alpha)
        else:
            at, counted = references(movable, self.references)
            ref = metric.gather(1, at[..., None].expand(-1, -1, metric.shape[-1]))
            score = energy(metric @ ref.transpose(1, 2), movable, margin, self.alpha, counted)

        # Rank by energy (stable: ties keep token order, whatever the padding); the 2k highest are
        # the candidates, alternating A (ranks 0, 2, ...) and B (ranks 1, 3, ...).
        order = score.argsort(dim=-1, descending=True, stable=True)
        k = torch.minimum(inp.remove, movable.sum(-1) // 2)
        positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
        top = int(k.max())
        if top == 0:
            return Reduction.hard(positions.clone())
        a_idx, b_idx = order[:, 0 : 2 * top : 2], order[:, 1 : 2 * top : 2]
        real = torch.arange(top, device=k.device) < k[:, None]  # pairs beyond a sequence's own k

        # Every A-token merges into its most similar B-token.
        rows = metric.gather(1, a_idx[..., None].expand(-1, -1, metric.shape[-1]))
        cols = metric.gather(1, b_idx[..., None].expand(-1, -1, metric.shape[-1]))
        scores = (rows @ cols.transpose(1, 2)).masked_fill_(~real[:, None, :], -torch.inf)
        partner = b_idx.gather(1, scores.argmax(-1))
        dest = positions.scatter(1, a_idx, torch.where(real, partner, a_idx))
        return Reduction.hard(dest)

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "margin": self.margin,
            "alpha": self.alpha,
            "references": self.references,
        }
