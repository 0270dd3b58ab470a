"""Token Transforming: Zeng, Yu, Kong and Tang, "Token Transforming: A Unified and Training-Free
Token Compression Framework for Vision Transformer Acceleration", arXiv 2506.05709, 2025.

Every reduction is a matrix from N tokens to fewer; pruning and merging are its one-hot special
cases, and Token Transforming spreads a removed token over several kept ones (many-to-many), so
less is lost and no retraining is needed. Faithful: kept tokens are targets and stay whole; each
removed token is spread over its `k` most similar targets (cosine) with shares softmax(similarity /
temperature) over those k, summing to 1 (sizes conserved); a target becomes the size-weighted
average of what it holds. `targets="attention"` keeps the tokens [CLS] attends to most (averaged
over heads) as the paper's informative tokens. Deviations: the reference repository publishes no
code, so top-k sparsity and temperature are tokenfuse's reading of the paper. By default
(`targets="matching"`) the removed tokens are those ToMe's bipartite matching would merge, each
spread over its k most similar B-tokens; with k = 1 or temperature 0 this is ToMe exactly. On a
mean-pooled text encoder (all-MiniLM-L6-v2, 200 BBC News documents, max length 256, keep 0.5) the
cosine to the full model's embeddings is 0.927 with matching against 0.904 with [CLS] attention,
0.927 on hidden states against 0.743 on keys, and falls as shares soften (0.928 at temperature
0.01, 0.925 at 0.05; ToMe 0.929): so hidden states, k = 2 and temperature 0.02 are the defaults,
where a removed token sends on average a tenth of itself to its second target. Similarity costs
as ToMe's A x B matrix (matching) or O(r * N * D) from the r removed tokens (attention).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core import Reduction
from ..core.matching import alternate, alternate_scores, bipartite_merge
from .base import LayerInput, Method
from .registry import register

SIMILARITIES = ("hidden", "keys")
TARGETS = ("matching", "attention")


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

    def __init__(
        self,
        k: int = 2,
        temperature: float = 0.02,
        similarity: str = "hidden",
        targets: str = "matching",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k (targets per removed token) must be a positive integer, got {k!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = one-hot), got {temperature!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
        self.k = k
        self.temperature = float(temperature)
        self.similarity = similarity
        self.targets = targets
        self.needs = frozenset({similarity} | ({"cls_attention"} if targets == "attention" else set()))
        # Matching removes at most one token per A-token; attention targets all but one token.
        self.max_removal = 0.5 if targets == "matching" else 1.0

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

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "k": self.k,
            "temperature": self.temperature,
            "similarity": self.similarity,
            "targets": self.targets,
        }
