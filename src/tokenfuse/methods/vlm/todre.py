"""ToDRE, its token-diversity stage (Li, Yang and Lu, "ToDRE: Visual Token Pruning via Diversity and Task
Awareness for Efficient Large Vision-Language Models", arXiv 2505.18757v1, 2025).

Reproduced: the first stage, greedy k-center selection after the vision encoder: each image starts from
a pivot, its token of highest [CLS] attention, then repeatedly adds the token whose cosine distance to
its nearest selected token is largest (ties to the earlier token) until it holds its count; the rest
are dropped, the kept tokens stay in patch order. The pivot rule, the cosine distance and the use of the
tower's selected features (before the projector) are our reading of the paper: no reference code was
found to check them against.
Left out: the second stage, which drops visual tokens inside the LLM by their relevance to the task
("information migration"); it needs the LLM placement and is not a boundary step. The paper's v2
replaces k-center by greedy max-sum diversification; this is the v1 algorithm.

Why the defaults: keep 0.25, 144 of LLaVA-1.5's 576 tokens, a budget its paper reports among others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import Reduction
from ..registry import register
from .base import VisualInput, VisualMethod, prune_to


def k_center(x: Tensor, pivot: Tensor, candidate: Tensor, count: Tensor) -> Tensor:
    """(B, N) bool: greedy k-center by cosine distance. x: (B, N, C) features; pivot: (B,) each row's
    first pick; candidate: (B, N) tokens that may be picked; count: (B,) picks per row (<= candidates)."""
    x = F.normalize(x.float(), dim=-1)
    rows = torch.arange(x.shape[0], device=x.device)
    chosen = torch.zeros_like(candidate)
    nearest = torch.full(candidate.shape, torch.inf, device=x.device).masked_fill(~candidate, -torch.inf)
    pick = pivot
    for step in range(int(count.max())):
        chosen[rows, pick] |= step < count  # a no-op for rows already full; no host sync
        distance = 1 - (x * x[rows, pick][:, None, :]).sum(-1)
        nearest = torch.minimum(nearest, distance).masked_fill(chosen, -torch.inf)
        pick = nearest.argmax(-1)  # the first farthest token
    return chosen


@register
class ToDRE(VisualMethod):
    name = "todre"
    paper = "Li et al. 2025, ToDRE: Visual Token Pruning via Diversity and Task Awareness (diversity stage)"
    placement = "boundary"
    prunes = True
    needs = frozenset({"cls_attention"})

    def decide(self, inp: VisualInput) -> Reduction:
        pivot = inp.cls_attention.float().masked_fill(~inp.visual, -torch.inf).argmax(-1)
        return prune_to(k_center(inp.x, pivot, inp.visual, inp.keep), inp)
