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
apart instead of the paper's [CLS] alone). The energy needs every pairwise similarity: O(N^2 * D),
as the paper's method inherently costs (ToMe's matching is a quarter of it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine import Reduction
from .base import LayerInput, Method
from .registry import register


def depth_margin(point: int, num_layers: int) -> float:
    """The paper's margin 0.9 - 0.9 * l / L for the layer l whose attention precedes `point`: early
    only near-duplicates count as neighbours, deeper ever looser clusters do."""
    layer = max(point - 1, 0)
    return 0.9 - 0.9 * layer / max(num_layers, 1)


def energy(sim: Tensor, movable: Tensor, margin: float, alpha: float = 1.0) -> Tensor:
    """(B, N) energy of each token: mean of ELU(cos - margin) over the movable tokens of its own
    sequence; -inf for the others. Consumes `sim` (cosine similarities, B x N x N) as scratch."""
    f = F.elu_(sim.sub_(margin), alpha=alpha).masked_fill_(~movable[:, None, :], 0.0)
    score = f.sum(-1) / movable.sum(-1, keepdim=True).clamp_min(1)
    return score.masked_fill(~movable, -torch.inf)


@register
class PiToMe(Method):
    name = "pitome"
    paper = "Tran et al., Accelerating Transformers with Spectrum-Preserving Token Merging, NeurIPS 2024"
    needs = frozenset({"hidden"})

    def __init__(self, margin: float | None = None, alpha: float = 1.0, **kwargs: Any) -> None:
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
        self.margin = None if margin is None else float(margin)
        self.alpha = float(alpha)

    def decide(self, inp: LayerInput) -> Reduction:
        movable = inp.tokens.mask & ~inp.tokens.protected
        metric = F.normalize(inp.x.float(), dim=-1)
        margin = depth_margin(inp.point, inp.num_layers) if self.margin is None else self.margin
        score = energy(metric @ metric.transpose(1, 2), movable, margin, self.alpha)

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
        return {**super().options(), "margin": self.margin, "alpha": self.alpha}
