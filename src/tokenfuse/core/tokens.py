"""The token state carried between layers, and the one format every reduction takes.

Every method, merging or pruning, only produces a `Reduction`: for each current token, the surviving
token(s) its size goes to and in what shares. `reduce.reduce` applies it to features, sizes and the
padding mask at once; attention and pooling read the sizes. Methods never touch any of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def take_along(t: Tensor, index: Tensor, dim: int = 1) -> Tensor:
    """The entries of t (B, ..., N, ...) at per-row positions index (B, M) along `dim`, whatever
    the dimensions after it: the gather every per-row re-layout of tokens shares."""
    shape = [1] * t.dim()
    shape[0], shape[dim] = index.shape
    size = list(t.shape)
    size[dim] = index.shape[1]
    return t.gather(dim, index.view(shape).expand(size))


@dataclass(frozen=True)
class Tokens:
    """What the engine knows about a (possibly reduced) batch of sequences.

    size: (B, N) how many original tokens each position stands for; 0 marks padding.
    protected: (B, N) tokens no method may remove or merge ([CLS], [SEP], caller-named ids).
    source: (B, N, N0) share of each original token held by each position; tracked only when
        reduced tokens must be mapped back to the full grid (dense outputs).
    origin: (B, N) for each position, where the token whose slot survives there stood when tracking
        started (its own place, or for a merged token the one it was merged into); any index at
        padding.
        Tracked only for hosts that gather per-position inputs (relative position bias, rotary
        angles, mask rows) for the tokens they now hold.
    rebuild: (B, N0, N) weights that rebuild each starting position from the current tokens, where
        a method brings its own way back to the grid (Expedite's reconstruction, `Reduction.rebuild`);
        `core.unmerge` then uses them instead of the sources. None until such a reduction.
    """

    size: Tensor
    protected: Tensor
    source: Tensor | None = None
    origin: Tensor | None = None
    rebuild: Tensor | None = None

    @classmethod
    def start(
        cls, mask: Tensor, protected: Tensor, track_source: bool = False, track_origin: bool = False
    ) -> Tokens:
        size = mask.to(torch.float32)
        source = torch.diag_embed(size) if track_source else None
        origin = torch.arange(size.shape[1], device=size.device).expand(size.shape) if track_origin else None
        return cls(size=size, protected=protected & mask.bool(), source=source, origin=origin)

    def take(self, index: Tensor) -> Tokens:
        """The state of the tokens at positions index (B, M) of each row, in that order: a per-row
        re-layout (padding moved to one side), every per-token field moved alike."""

        def at(t: Tensor | None, dim: int = 1) -> Tensor | None:
            return None if t is None else take_along(t, index, dim)

        return Tokens(
            size=at(self.size),
            protected=at(self.protected),
            source=at(self.source),
            origin=at(self.origin),
            rebuild=at(self.rebuild, 2),
        )

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
    order: (B, N) optional sort key that lays the survivors out by increasing key, ties in their
        current order, for methods whose next decision depends on where tokens sit (ToMe's reference
        layout); only the survivors' keys matter. Without it survivors keep their current order.
    rebuild: (B, N, N) optional weights that rebuild each current token from the current tokens
        that survive (columns of the others are ignored): a method's own way back to the grid
        (Expedite's reconstruction), used by `core.unmerge` in place of the shares. A reduction
        without one that follows it is composed with it through its shares.
    gain: (B, N) optional factor on each survivor's averaged features, for a merge that sums rather
        than averages (VisionZip's reference: a target plus the plain mean of the tokens merged into it).
    A token survives iff some share is sent to it.
    """

    dest: Tensor
    weight: Tensor
    feature_weight: Tensor | None = None
    order: Tensor | None = None
    rebuild: Tensor | None = None
    gain: Tensor | None = None

    @classmethod
    def hard(cls, dest: Tensor, order: Tensor | None = None) -> Reduction:
        """Each token goes whole to one destination (itself if it survives); -1 drops it."""
        dest = dest[..., None]
        return cls(dest=dest, weight=(dest >= 0).to(torch.float32), order=order)
