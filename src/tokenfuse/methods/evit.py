"""EViT: Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022.

Faithful: between a layer's attention and its MLP, the tokens the [CLS] query attends to most
(attention averaged over heads) are kept, and all the others, the inattentive ones, are fused into
one token weighted by their [CLS] attention; the fused token is an ordinary token afterwards and
may be kept or fused again. [CLS] is never a candidate; neither is [SEP] or any protected token.
Deviations: the paper reorganises at three layers of a fine-tuned DeiT classifier; tokenfuse is
training-free, the engine's schedule spreads the budget over every point after an attention, and
the text encoder is mean-pooled, so [CLS] attention only stands in for importance. The fused
feature is the attention-weighted average (the paper's weighted sum, divided by the weights'
total), so that an untrained model sees it at the scale of its other tokens; each fused token
counts by the attention it received, which with proportional attention already includes its
size, so size is not counted twice; fuse="authors" gives the paper's weighted sum (the average
times the group's total attention, `Reduction.gain`). The step keeps exactly count - remove tokens, the fused
one included, where the paper keeps a fixed ratio plus the fused token.

Why the defaults: the budget and schedule are the engine's, as for every method (half the work, a
geometric schedule); fuse="average" keeps the fused token at its tokens' scale, which an untrained
model needs (README, "Why the defaults", compares the two).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..core import Reduction
from ..core.matching import ranks
from .base import LayerInput, Method
from .options import Option
from .registry import register


@register
class EViT(Method):
    name = "evit"
    paper = (
        "Liang et al., Not All Patches are What You Need: Expediting Vision Transformers via Token "
        "Reorganizations, ICLR 2022"
    )
    needs = frozenset({"cls_attention"})
    fuse: Literal["average", "authors"] = Option(
        "average", "fused token: attention-weighted average, or the authors' weighted sum"
    )

    def decide(self, inp: LayerInput) -> Reduction:
        tokens = inp.tokens
        attn = inp.cls_attention().float()
        movable = tokens.mask & ~tokens.protected
        # Rank movable tokens by [CLS] attention, most attended first; the rest sort after them.
        order, rank = ranks(attn.masked_fill(~movable, -torch.inf), descending=True)
        positions = torch.arange(order.shape[1], device=order.device)
        # Removing r tokens fuses r + 1 of them into one; with nothing to remove nothing is fused.
        n_movable = movable.sum(-1)
        n_fused = torch.where(inp.remove > 0, torch.minimum(inp.remove + 1, n_movable), 0)
        n_kept = (n_movable - n_fused)[:, None]
        fused = movable & (rank >= n_kept)
        # The fused token sits at the most attended of the inattentive tokens.
        target = order.gather(1, n_kept.clamp_max(order.shape[1] - 1))
        dest = torch.where(fused, target, positions)
        # Each fused token counts by the attention it received: the engine weighs features by size
        # times feature_weight, so divide the size out. Scaled to the group's largest weight so
        # that the weights stay representable in half precision.
        share = torch.where(fused, attn / tokens.size.masked_fill(~fused, 1.0), 0.0)
        top = share.amax(-1, keepdim=True)
        share = torch.where(top > 0, share / top.clamp_min(torch.finfo(share.dtype).tiny), 1.0)
        red = Reduction.hard(dest)
        gain = None
        if self.fuse == "authors":  # the weighted sum: the average times the group's total attention
            total = torch.where(fused, attn, 0.0).sum(-1, keepdim=True)
            gain = torch.where(positions == target, total, 1.0).where(n_fused[:, None] > 0, 1.0)
        return Reduction(red.dest, red.weight, torch.where(fused, share, 1.0), gain=gain)
