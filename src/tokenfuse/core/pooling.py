"""Reading reduced tokens out: size-weighted pooling, and the map back to the full grid."""

from __future__ import annotations

import torch
from torch import Tensor

from .tokens import Tokens


def pool_mean(x: Tensor, size: Tensor) -> Tensor:
    """Mean over tokens weighted by size: with no reduction, the masked mean of the full model."""
    size = size.to(x.dtype)[..., None]
    return (x * size).sum(1) / size.sum(1).clamp_min(1e-9)


def unmerge(x: Tensor, tokens: Tokens) -> Tensor:
    """Map reduced tokens (B, N, C) back to the original grid (B, N0, C), for dense outputs: each
    original position gets the token it was merged into, or the mixture of the tokens it was spread
    over (many-to-many reductions), weighted by its shares. A position that was pruned outright
    holds no share anywhere; it gets the size-weighted mean of the surviving tokens, a neutral fill.
    Where a method brought its own reconstruction (`Tokens.rebuild`, Expedite's), it is used instead."""
    if tokens.rebuild is not None:
        return tokens.rebuild.to(x.dtype) @ x
    if tokens.source is None:
        raise ValueError("source was not tracked; apply the method with track_source=True")
    source = tokens.source.to(x.dtype)
    full = source.transpose(1, 2) @ x
    held = source.sum(1)[..., None]
    return torch.where(held > 0, full, pool_mean(x, tokens.size)[:, None, :])
