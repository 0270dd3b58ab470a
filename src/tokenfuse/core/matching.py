"""Bipartite soft matching (ToMe), shared by every method that merges pairs by a score."""

from __future__ import annotations

import torch
from torch import Tensor

from .tokens import Reduction, Tokens


def alternate(x: Tensor) -> tuple[Tensor, Tensor]:
    """ToMe's split: even positions are sources (set A), odd positions destinations (set B)."""
    return x[:, ::2], x[:, 1::2]


def halves(metric: Tensor) -> tuple[Tensor, Tensor]:
    """`alternate` for a product of the halves. While torch.compile traces, they are copied first:
    a product of the strided halves guards on the parity of N, and a static-mode model's widths
    take both parities, so every pattern of parities compiled anew (on 400 BBC documents MiniLM hit
    the recompile limit and fell back to eager). In eager mode the copy would triple the product's
    time."""
    a, b = alternate(metric)
    if torch.compiler.is_compiling():
        a, b = a.contiguous(), b.contiguous()
    return a, b


def alternate_scores(metric: Tensor) -> Tensor:
    """(B, ceil(N/2), floor(N/2)) dot products of the A-tokens of metric (B, N, C) with its B-tokens."""
    a, b = halves(metric)
    return a @ b.transpose(1, 2)


def cosine_partners(metric: Tensor, tokens: Tokens) -> tuple[Tensor, Tensor]:
    """(B, ceil(N/2)) each A-token's best cosine similarity to a movable B-token of metric (B, N, C),
    and that partner's index among the B-tokens (`best_partners` of the cosine scores, as computed).

    Cheaper than normalizing every token and masking the scores (the overhead ToMe adds, README):
    an A-token's scale does not change which partner is best, so the A side is normalized after
    the maximum, on one value per token; the excluded columns are masked by a bias the product adds.
    Norms are floored, so a zero token (the padding a reduction leaves) scores 0, never NaN."""
    a, b = halves(metric)
    _, b_ok = alternate(tokens.mask & ~tokens.protected)
    tiny = torch.finfo(metric.dtype).tiny
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(tiny)
    bias = torch.zeros(b_ok.shape, dtype=metric.dtype, device=metric.device).masked_fill_(~b_ok, -torch.inf)
    best, partner = torch.baddbmm(bias[:, None, :], a, b.transpose(1, 2)).max(-1)
    return best / a.norm(dim=-1).clamp_min(tiny), partner


def best_partners(scores: Tensor, tokens: Tokens) -> tuple[Tensor, Tensor]:
    """(B, ceil(N/2)) each A-token's highest score (B, ceil(N/2), floor(N/2)) with a movable B-token
    (padding and protected tokens excluded), and that partner's index among the B-tokens."""
    _, b_ok = alternate(tokens.mask & ~tokens.protected)
    # masked by a where: 0.6x masked_fill's time over the scores; an added bias would be faster, but
    # lets a NaN of an excluded token through (`cosine_partners` floors its norms instead)
    return torch.where(b_ok[:, None, :], scores, -torch.inf).max(-1)


def ranks(key: Tensor, descending: bool = False) -> tuple[Tensor, Tensor]:
    """Stable sort order of `key` per row, and each position's rank in it. Stable, so ties keep
    token order and a sequence ranks the same alone or in a padded batch."""
    order = key.argsort(dim=-1, descending=descending, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=key.device).expand_as(order)
    )
    return order, rank


#: where survivors go after a merge: "original" keeps their order; "reference" lays them out as
#: ToMe's reference code does, which changes how the next alternating split pairs them
ORDERS = ("original", "reference")


def check_order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return order


def bipartite_merge(scores: Tensor, tokens: Tokens, remove: Tensor, order: str = "original") -> Reduction:
    """Merge the `remove[b]` A-tokens with the highest score into their best B-partner.

    scores: (B, ceil(N/2), floor(N/2)) between A and B tokens, higher = more alike. Padding and
    protected tokens are excluded on both sides, so each sequence is reduced exactly as it would
    be alone, and at most one token per A-token is removed. order: one of ORDERS.
    """
    return merge_best(*best_partners(scores, tokens), tokens, remove, order)


def merge_best(
    best: Tensor, partner: Tensor, tokens: Tokens, remove: Tensor, order: str = "original"
) -> Reduction:
    """`bipartite_merge` from each A-token's best score (B, ceil(N/2)) with a movable B-token and
    that partner's index among the B-tokens (`best_partners`, `cosine_partners`)."""
    check_order(order)
    movable = tokens.mask & ~tokens.protected
    a_ok, _ = alternate(movable)
    best = best.masked_fill(~a_ok, -torch.inf)
    _, rank = ranks(best, descending=True)
    merged = (rank < remove[:, None]) & (best > -torch.inf)

    n = tokens.size.shape[1]
    dest = torch.arange(n, device=best.device).expand(best.shape[0], n).clone()
    dest[:, ::2] = torch.where(merged, 2 * partner + 1, dest[:, ::2])
    layout = reference_order(movable, tokens.protected, rank) if order == "reference" else None
    return Reduction.hard(dest, layout)


def reference_order(movable: Tensor, protected: Tensor, rank: Tensor) -> Tensor:
    """(B, N) sort key of the layout ToMe's reference code leaves after a merge.

    movable, protected: (B, N); rank: (B, ceil(N/2)) each A-token's rank by best score, best first.
    The layout: the protected tokens that lead the sequence ([CLS], distillation, registers), the
    unmerged A-tokens, the B-tokens, then the protected tokens that close it ([SEP]), each group in
    current order; a protected token between movable ones stays in its A or B group. In a sequence
    with no protected token the unmerged A-tokens stay in score order, best first, as the reference
    code leaves them when a model has no [CLS].
    """
    B, N = movable.shape
    position = torch.arange(N, device=rank.device).expand(B, N)
    before = movable.cumsum(1) > 0
    after = movable.flip(1).cumsum(1).flip(1) > 0
    key = position + 2 * N
    key[:, ::2] = N + torch.where(protected.any(-1, keepdim=True), position[:, ::2], rank)
    key = torch.where(protected & ~before, position, key)
    return torch.where(protected & before & ~after, position + 3 * N, key)
