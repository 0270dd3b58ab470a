"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
CVPR 2025; reference code vbdi/divprune, `DivPrune` in LLaVA/llava/model/llava_arch.py).

Faithful: pruning as a max-min diversity problem, solved greedily on the cosine distance (1 - cosine
similarity) between an image's projected visual tokens (the LLM's input embeddings, where the reference
prunes, before the first decoder layer). The first token is the most isolated one, whose nearest other
token is farthest; each next token is the one whose distance to its nearest selected token is largest
(ties to the earlier token); the selected tokens stay in patch order, the rest are dropped.
Deviations: counts are tokenfuse's, ceil(keep x tokens), where the reference rounds (its default 0.098
of 576 keeps 56 there, 57 here; keep=56/576 gives 56); it prunes row 0 of a batch of one, here every
image of a batch alike. A token once selected is never selected again (in the reference, exact
duplicates can tie with a selected token's own distance and be picked twice, keeping fewer). Distances
are computed in float32.

Why the defaults: keep 0.25, 144 of LLaVA-1.5's 576 tokens, a budget its paper reports among others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import Reduction
from ..registry import register
from .base import VisualInput, VisualMethod, prune_to
from .todre import k_center


def most_isolated(x: Tensor, candidate: Tensor) -> Tensor:
    """(B,) each row's candidate whose nearest other candidate is farthest by cosine distance (the first
    to go). x: (B, N, C) features; candidate: (B, N) bool."""
    x = F.normalize(x.float(), dim=-1)
    distance = 1 - x @ x.transpose(1, 2)
    self_or_out = torch.eye(x.shape[1], dtype=torch.bool, device=x.device) | ~candidate[:, None, :]
    nearest = distance.masked_fill(self_or_out, torch.inf).amin(-1)
    return nearest.masked_fill(~candidate, -torch.inf).argmax(-1)


def max_min_select(x: Tensor, candidate: Tensor, count: Tensor) -> Tensor:
    """(B, N) bool: DivPrune's greedy max-min selection of `count` (B,) tokens per row among the
    `candidate` (B, N) ones, by cosine distance between the features x (B, N, C)."""
    return k_center(x, most_isolated(x, candidate), candidate, count)


@register
class DivPrune(VisualMethod):
    name = "divprune"
    paper = "Alvar et al. 2025, DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
    placement = "boundary"
    prunes = True
    needs = frozenset({"projected"})

    def decide(self, inp: VisualInput) -> Reduction:
        return prune_to(max_min_select(inp.projected, inp.visual, inp.keep), inp)
