"""Token Transforming: Zeng, Yu, Kong and Tang, "Token Transforming: A Unified and Training-Free
Token Compression Framework for Vision Transformer Acceleration", arXiv 2506.05709, 2025.

Every reduction is a matrix from N tokens to fewer; pruning and merging are its one-hot special
cases, and Token Transforming spreads a removed token over several kept ones (many-to-many), so
less is lost and no retraining is needed. Faithful: kept tokens are targets and stay whole; each
removed token is spread over its `k` most similar targets (cosine) with shares softmax(similarity /
temperature) over those k, summing to 1 (sizes conserved); a target becomes the size-weighted
average of what it holds. `targets="attention"` keeps the tokens [CLS] attends to most (averaged
over heads) as the paper's informative tokens.

Deviations: the authors' repository publishes no code (a README and a licence), so top-k sparsity and
the temperature are tokenfuse's reading of the paper. By default (`targets="matching"`) the removed
tokens are those ToMe's bipartite matching would merge, each spread over its k most similar
B-tokens; with k = 1 or temperature 0 this is ToMe exactly. Similarity costs as ToMe's A x B matrix
(matching) or O(r * N * D) from the r removed tokens (attention).

Why the defaults: on a mean-pooled text encoder matching beats [CLS]-attention targets, hidden states
beat keys, and agreement with the full model falls as shares soften, so k = 2 at a low temperature
spreads only a small part of each token (README, "Why the defaults").
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ..core import Reduction
from ..core.matching import alternate, alternate_scores, bipartite_merge
from .base import LayerInput, Method
from .options import Option
from .registry import register


def _shares(scores: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """The k best candidates of each row and their shares: softmax(score / temperature) over them,
    one-hot on the best at temperature 0. A slot with no share points nowhere (-1)."""
    k = min(k, scores.shape[-1])
    best, index = scores.float().topk(k, dim=-1)
    if temperature == 0 or k == 1:
        weight = torch.zeros_like(best)
        weight[..., 0] = 1.0
    else:
        weight = (best / temperature).softmax(-1)
    weight = weight.masked_fill(best == -torch.inf, 0.0).nan_to_num(0.0)
    return index.masked_fill(weight == 0, -1), weight


def _identity(n: int, k: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Every token whole to itself: dest (B, N, k), weight (B, N, k)."""
    dest = torch.full((like.shape[0], n, k), -1, dtype=torch.long, device=like.device)
    dest[..., 0] = torch.arange(n, device=like.device)
    weight = torch.zeros(like.shape[0], n, k, device=like.device)
    weight[..., 0] = 1.0
    return dest, weight


@register
class TokenTransforming(Method):
    name = "transforming"
    paper = (
        "Zeng et al., Token Transforming: A Unified and Training-Free Token Compression Framework "
        "for Vision Transformer Acceleration, arXiv 2025"
    )

    k: int = Option(2, "targets per removed token", "[1, inf)")
    temperature: float = Option(0.02, "softness of the shares; 0: one-hot", "[0, inf)")
    similarity: Literal["hidden", "keys"] = Option("hidden", "what tokens are compared on")
    targets: Literal["matching", "attention"] = Option("matching", "which tokens stay as targets")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        attention = {"cls_attention"} if self.targets == "attention" else set()
        self.needs = frozenset({self.similarity} | attention)
        # Matching removes at most one token per A-token; attention targets all but one token.
        self.max_removal = 0.5 if self.targets == "matching" else 1.0

    def decide(self, inp: LayerInput) -> Reduction:
        metric = inp.keys() if self.similarity == "keys" else inp.x
        metric = metric / metric.norm(dim=-1, keepdim=True)  # as ToMe, so that k = 1 is ToMe exactly
        if self.targets == "matching":
            return self._matching(metric, inp)
        return self._attention(metric, inp)

    def _matching(self, metric: Tensor, inp: LayerInput) -> Reduction:
        """Sources: the A-tokens ToMe would merge; each is spread over its k most similar B-tokens."""
        tokens = inp.tokens
        movable = tokens.mask & ~tokens.protected
        a_ok, b_ok = alternate(movable)
        scores = alternate_scores(metric).masked_fill(~(a_ok[:, :, None] & b_ok[:, None, :]), -torch.inf)
        n = metric.shape[1]
        positions = torch.arange(n, device=metric.device)
        merged = bipartite_merge(scores, tokens, inp.remove).dest[:, ::2, 0] != positions[::2]
        partner, weight = _shares(scores, self.k, self.temperature)
        dest, share = _identity(n, partner.shape[-1], metric)
        dest[:, ::2] = torch.where(merged[..., None], 2 * partner + 1, dest[:, ::2])
        share[:, ::2] = torch.where(merged[..., None], weight, share[:, ::2])
        return Reduction(dest, share)

    def _attention(self, metric: Tensor, inp: LayerInput) -> Reduction:
        """Targets: the most [CLS]-attended movable tokens; the rest are spread over the k most
        similar targets. At least one movable target stays, so sizes always have somewhere to go."""
        tokens = inp.tokens
        movable = tokens.mask & ~tokens.protected
        remove = torch.minimum(inp.remove, (movable.sum(-1) - 1).clamp_min(0))
        # Least attended first; protected tokens and padding sort last and are never sources.
        attn = inp.cls_attention().float().masked_fill(~movable, torch.inf)
        order = attn.argsort(dim=-1, stable=True)
        r = int(remove.max())
        n = metric.shape[1]
        src = order[:, :r]  # (B, r) candidate sources, in order of attention
        is_source = torch.arange(r, device=metric.device) < remove[:, None]
        target = movable.clone().scatter_(1, src, ~is_source & movable.gather(1, src))
        picked = metric.gather(1, src[..., None].expand(-1, -1, metric.shape[-1]))
        scores = (picked @ metric.transpose(1, 2)).masked_fill(~target[:, None, :], -torch.inf)
        index, weight = _shares(scores, self.k, self.temperature)
        dest, share = _identity(n, index.shape[-1], metric)
        rows = src[..., None].expand(-1, -1, index.shape[-1])
        dest.scatter_(1, rows, torch.where(is_source[..., None], index, dest.gather(1, rows)))
        share.scatter_(1, rows, torch.where(is_source[..., None], weight, share.gather(1, rows)))
        return Reduction(dest, share)
