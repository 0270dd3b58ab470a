"""The shared engine: the token state carried between layers, one reduction format, one way to apply it.

Every method, merging or pruning, only produces a `Reduction`: for each current token, the surviving
token(s) its size goes to and in what shares. `reduce` applies it to features, sizes and the
padding mask at once; attention and pooling read the sizes. Methods never touch any of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tokens:
    """What the engine knows about a (possibly reduced) batch of sequences.

    size: (B, N) how many original tokens each position stands for; 0 marks padding.
    protected: (B, N) tokens no method may remove or merge ([CLS], [SEP], caller-named ids).
    source: (B, N, N0) share of each original token held by each position; tracked only when
        reduced tokens must be mapped back to the full grid (dense outputs).
    """

    size: Tensor
    protected: Tensor
    source: Tensor | None = None

    @classmethod
    def start(cls, mask: Tensor, protected: Tensor, track_source: bool = False) -> Tokens:
        size = mask.to(torch.float32)
        source = torch.diag_embed(size) if track_source else None
        return cls(size=size, protected=protected & mask.bool(), source=source)

    @property
    def mask(self) -> Tensor:
        return self.size > 0

    @property
    def count(self) -> Tensor:
        """Real (non-padding) tokens per sequence."""
        return self.mask.sum(-1)


@dataclass(frozen=True)
class Reduction:
    """One reduction step, as a token transformation.

    dest: (B, N, K) index of the surviving token each share of a token goes to; -1 drops the share.
    weight: (B, N, K) the share of the token's size sent to dest. Shares of a merged token sum to
        1 (size is conserved); a pruned token has all shares 0. K = 1 for hard merges; K > 1
        spreads a token over several targets (many-to-many, Token Transforming).
    feature_weight: (B, N) optional extra weight of each token in the feature average, multiplied
        with its size and share, for methods that fuse by importance (EViT) rather than by size
        alone; a method that wants importance only divides by size itself.
    A token survives iff some share is sent to it; survivors keep their original order.
    """

    dest: Tensor
    weight: Tensor
    feature_weight: Tensor | None = None

    @classmethod
    def hard(cls, dest: Tensor) -> Reduction:
        """Each token goes whole to one destination (itself if it survives); -1 drops it."""
        dest = dest[..., None]
        return cls(dest=dest, weight=(dest >= 0).to(torch.float32))


def reduce(x: Tensor, tokens: Tokens, red: Reduction) -> tuple[Tensor, Tokens]:
    """Apply a reduction to features (B, N, C) and to the token state together.

    Survivors are compacted to the front in their original order; padding follows. A survivor's
    feature is the size-weighted (times feature_weight) average of the shares sent to it.
    """
    B, N, C = x.shape
    K = red.dest.shape[-1]
    weight = red.weight * tokens.mask[..., None]  # padding never moves into a real token
    dest = red.dest.masked_fill(weight <= 0, -1)
    _check_protected(tokens, dest, weight)

    survives = torch.zeros(B, N + 1, dtype=torch.bool, device=x.device)
    survives.scatter_(1, (dest + 1).flatten(1), True)
    survives = survives[:, 1:]
    position = survives.cumsum(1) - 1
    new_n = int(survives.sum(1).max())
    # Flat row of each share in a (B * new_n + 1) buffer; dropped shares go to the last, trash row.
    rows = position.gather(1, dest.clamp_min(0).flatten(1)).view_as(dest)
    rows = rows + torch.arange(B, device=x.device)[:, None, None] * new_n
    rows = torch.where(dest >= 0, rows, B * new_n).flatten()

    def sum_into(values: Tensor) -> Tensor:
        flat = values.reshape(B * N * K, -1)
        return flat.new_zeros(B * new_n + 1, flat.shape[1]).index_add_(0, rows, flat)[:-1]

    mass = weight * tokens.size[..., None]
    size = sum_into(mass).view(B, new_n)
    fmass = mass if red.feature_weight is None else mass * red.feature_weight[..., None]
    fmass = fmass.to(x.dtype)
    values = x[:, :, None, :] * fmass[..., None] if K > 1 else x * fmass
    out = sum_into(values).view(B, new_n, C)
    out /= sum_into(fmass).view(B, new_n, 1).clamp_min(torch.finfo(x.dtype).tiny)

    protected = torch.zeros(B, new_n + 1, dtype=torch.bool, device=x.device)
    protected.scatter_(1, torch.where(survives, position, new_n), tokens.protected)
    source = None
    if tokens.source is not None:
        shares = tokens.source[:, :, None, :] * weight[..., None].to(tokens.source.dtype)
        source = sum_into(shares).view(B, new_n, -1)
    return out, Tokens(size=size, protected=protected[:, :new_n], source=source)


def _check_protected(tokens: Tokens, dest: Tensor, weight: Tensor) -> None:
    """A method that merges or drops a protected token, or merges into one, is a bug: fail loudly."""
    if not tokens.protected.any():
        return
    own = torch.arange(dest.shape[1], device=dest.device)[None, :, None]
    moved = (dest != own) & (dest >= 0) & (weight > 0)
    kept_whole = (dest[..., 0] == own[..., 0]) & (weight[..., 0] == 1) & (weight[..., 1:] == 0).all(-1)
    into = torch.zeros_like(tokens.size).scatter_add_(
        1, dest.clamp_min(0).flatten(1), moved.flatten(1).float()
    )
    if (tokens.protected & (~kept_whole | (into > 0))).any():
        raise RuntimeError("a reduction touched a protected token; methods must leave them alone")


def attention_bias(tokens: Tokens, dtype: torch.dtype, proportional: bool) -> Tensor:
    """Additive attention mask (B, 1, 1, N): padding is masked, and with proportional attention
    each key counts as many times as the tokens it stands for (log size on the logits, as in ToMe)."""
    low = torch.finfo(dtype).min
    bias = tokens.size.log() if proportional else torch.zeros_like(tokens.size)
    return torch.where(tokens.mask, bias, low).to(dtype)[:, None, None, :]


def attention_probs(q: Tensor, k: Tensor, tokens: Tokens, proportional: bool) -> Tensor:
    """Attention probabilities (B, H, Nq, N) of queries over the keys of `tokens`, as the layer
    computed them (scaled dot product, padding masked, log size added when proportional)."""
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    logits += attention_bias(tokens, logits.dtype, proportional)
    return logits.softmax(-1)


def pool_mean(x: Tensor, size: Tensor) -> Tensor:
    """Mean over tokens weighted by size: with no reduction, the masked mean of the full model."""
    size = size.to(x.dtype)[..., None]
    return (x * size).sum(1) / size.sum(1).clamp_min(1e-9)


def unmerge(x: Tensor, tokens: Tokens) -> Tensor:
    """Map reduced tokens (B, N, C) back to the original grid (B, N0, C), for dense outputs: each
    original position gets the token it was merged into, or the mixture of the tokens it was spread
    over (many-to-many reductions), weighted by its shares. A position that was pruned outright
    holds no share anywhere; it gets the size-weighted mean of the surviving tokens, a neutral fill."""
    if tokens.source is None:
        raise ValueError("source was not tracked; apply the method with track_source=True")
    source = tokens.source.to(x.dtype)
    full = source.transpose(1, 2) @ x
    held = source.sum(1)[..., None]
    return torch.where(held > 0, full, pool_mean(x, tokens.size)[:, None, :])
