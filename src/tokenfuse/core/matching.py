"""Bipartite soft matching (ToMe), shared by every method that merges pairs by a score."""

from __future__ import annotations

import torch
from torch import Tensor

from .tokens import Reduction, Tokens


def alternate(x: Tensor) -> tuple[Tensor, Tensor]:
    """ToMe's split: even positions are sources (set A), odd positions destinations (set B)."""
    return x[:, ::2], x[:, 1::2]


def ranks(key: Tensor, descending: bool = False) -> tuple[Tensor, Tensor]:
    """Stable sort order of `key` per row, and each position's rank in it. Stable, so ties keep
    token order and a sequence ranks the same alone or in a padded batch."""
    order = key.argsort(dim=-1, descending=descending, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=key.device).expand_as(order)
    )
    return order, rank


def bipartite_merge(scores: Tensor, tokens: Tokens, remove: Tensor) -> Reduction:
    """Merge the `remove[b]` A-tokens with the highest score into their best B-partner.

    scores: (B, ceil(N/2), floor(N/2)) between A and B tokens, higher = more alike. Padding and
    protected tokens are excluded on both sides, so each sequence is reduced exactly as it would
    be alone, and at most one token per A-token is removed.
    """
    movable = tokens.mask & ~tokens.protected
    a_ok, b_ok = alternate(movable)
    scores = scores.masked_fill(~(a_ok[:, :, None] & b_ok[:, None, :]), -torch.inf)
    best, partner = scores.max(-1)
    _, rank = ranks(best, descending=True)
    merged = (rank < remove[:, None]) & (best > -torch.inf)

    n = tokens.size.shape[1]
    dest = torch.arange(n, device=scores.device).expand(scores.shape[0], n).clone()
    dest[:, ::2] = torch.where(merged, 2 * partner + 1, dest[:, ::2])
    return Reduction.hard(dest)
