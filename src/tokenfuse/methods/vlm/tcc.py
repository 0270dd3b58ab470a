"""Token-level correlation-guided compression (Zhang et al., "Token-level Correlation-guided Compression
for Efficient Multimodal Document Understanding", 2024, arXiv 2407.14439; the repository the paper
names, JiuTian-VL/TokenCorrCompressor, holds no released code, so this is built from the paper).

From the paper: an image cut into views (a global view and sub-image crops) is compressed per view.
A view's pattern repetitiveness comes from patch-patch correlation, the cosine similarity of the
tower's keys between its patches: a patch with a highly correlated counterpart in its view is
redundant, and the share of non-redundant patches is the view's information density. Within a view,
the informative tokens are those the [CLS] token correlates with most (its attention to them); the
rest are dropped.

Interpretation (the method section was not available to check against, only the paper's abstract and
a summary of it): a patch is redundant when its highest key cosine similarity to another patch of its
view exceeds `threshold` (its value is ours); the paper compresses each view by its own density with
no total, while here the image's budget, ceil(keep x its content tokens), is shared among its views in
proportion to their non-redundant patches (a view's tokens times its density), apportioned by the
divisor (Sainte-Lague) rule so the counts sum to the budget exactly and no view gets more tokens than
it has; a view with no non-redundant patch gets tokens only once every other view is spent. Within a
view the top tokens by [CLS] attention (the selected tower layer, mean over heads) are kept, ties to
the earlier token. The base view counts as one view like each crop; a crop cut by the unpadding is a
view of its remaining tokens; on OneVision's downsampled crop grid a token belongs to the crop of its
nearest source position. Where the tower has no [CLS] (SigLIP: LLaVA-OneVision), a token's score is
its distinctiveness instead, minus its mean key cosine similarity to the other patches of its view
(the patch-patch correlation again: the least repeated tokens first). An image that is one view (an
image without crops; every LLaVA-1.5 image) keeps its top tokens by that score: the rule's single-view
case, with no share to set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import Reduction
from ..options import Option
from ..registry import register
from .base import VisualInput, VisualMethod, prune_to, top_count


def correlation(keys: Tensor, views: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N, N) the key cosine similarity of each pair of tokens, and (B, N, N) whether they are two
    different tokens of one view. keys: (B, N, D); views: (B, N), -1 for padding."""
    k = F.normalize(keys.float(), dim=-1)
    eye = torch.eye(views.shape[1], dtype=torch.bool, device=views.device)
    same = (views[:, :, None] == views[:, None, :]) & (views >= 0)[:, :, None] & ~eye
    return k @ k.transpose(1, 2), same


def view_shares(redundant: Tensor, views: Tensor) -> tuple[Tensor, Tensor]:
    """Per token, the non-redundant tokens of its view and the tokens of its view (B, N) each: the
    view's weight in sharing the budget, and its size."""
    index = views.clamp_min(0)
    real = (views >= 0).float()
    size = torch.zeros_like(real).scatter_add_(1, index, real)
    dense = torch.zeros_like(real).scatter_add_(1, index, real * (~redundant).float())
    return dense.gather(1, index), size.gather(1, index)


def rank_in_view(score: Tensor, same: Tensor) -> Tensor:
    """(B, N) each token's rank by `score` (B, N) among the tokens of its view, highest first, ties to
    the earlier token."""
    n = score.shape[1]
    earlier = torch.ones(n, n, dtype=torch.bool, device=score.device).tril(-1)  # [i, j]: j < i
    above = (score[:, None, :] > score[:, :, None]) | ((score[:, None, :] == score[:, :, None]) & earlier)
    return (above & same).sum(-1)


def allocate(rank: Tensor, weight: Tensor, size: Tensor, inp: VisualInput) -> Tensor:
    """(B, N) bool: `inp.keep` tokens per row, each view's best-ranked ones, views sharing the budget
    by the divisor rule on their weight: the token of rank r in a view of weight w comes at
    (r + 1/2) / w; views of weight 0 after all others, by size."""
    slot = rank.double() + 0.5
    last = rank.shape[1] + 1.0  # beyond every (r + 1/2) / w with w >= 1
    order = torch.where(weight > 0, slot / weight.clamp_min(1), last + slot / size.clamp_min(1))
    return top_count(-order, inp.visual, inp.keep)


@register
class TokenCorrelation(VisualMethod):
    name = "tcc"
    paper = (
        "Zhang et al. 2024, Token-level Correlation-guided Compression for Efficient Multimodal Document "
        "Understanding"
    )
    placement = "boundary"
    prunes = True
    needs = frozenset({"cls_attention", "keys", "views"})
    cls_substitute = True

    threshold: float = Option(0.9, "key cosine similarity above which a patch repeats another", "[-1, 1]")

    def decide(self, inp: VisualInput) -> Reduction:
        views = inp.views if inp.views is not None else torch.where(inp.visual, 0, -1)
        views = views.masked_fill(~inp.visual, -1)
        similarity, same = correlation(inp.keys, views)
        redundant = similarity.masked_fill(~same, -torch.inf).amax(-1) > self.threshold
        weight, size = view_shares(redundant, views)
        if inp.cls_attention is not None:
            score = inp.cls_attention.float()
        else:  # no [CLS]: the least repeated tokens of a view first
            score = -(similarity * same).sum(-1) / same.sum(-1).clamp_min(1)
        return prune_to(allocate(rank_in_view(score, same), weight, size, inp), inp)
