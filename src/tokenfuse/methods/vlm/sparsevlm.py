"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML 2025; reference code Gumpest/SparseVLMs, version 1.0).

Faithful: text raters, the question tokens most relevant to the image (at or above the mean
relevance, so at least the most relevant one; the reference: strictly above), score each visual token
by the attention they pay it (mean over heads and raters); visual tokens are pruned progressively in
three stages, entering layers 3, 7 and 16 (the reference prunes after its layers 2, 6 and 15, scored
with those layers' attention), text tokens never pruned. `keep` is the reference's budget (192, 128,
96 or 64 of LLaVA's 576 tokens, about the visual tokens averaged over the layers); each stage keeps
the reference's count for that budget (192: 300, 200, 110), linearly interpolated between budgets and
up to all tokens at keep 1. Token recycling as in the reference: of the tokens a stage removes, the
30% (+1) the raters attend to most are clustered by density peaks on k nearest neighbours (DPC-kNN on
the hidden states, k = the cluster count, one cluster per 10 recycled tokens, +1) and each cluster
averaged; the rest are dropped.

Deviations: the raters are chosen at every stage from that layer's text attention (the share of each
question token's attention that goes to the image), not once from the LLM's input embeddings (their
dot products, softmax over the text tokens), which the LLM placement does not see. A recycled cluster
is its members merged into its density-peak centre, which keeps the centre's slot and position; the
reference builds a new token and places it after the kept visual tokens. A stage's count holds its
clusters (the reference adds them to its count), and a stage left with one token keeps the raters'
choice, no cluster. Members are averaged by size (the reference: a plain mean, the same at the first
stage). The cluster count comes from the net reduction of the stage (the reference: from its fixed
kept count, without the clusters). Ties break by position (the reference adds 1e-6 noise to the
densities). The default layers are the reference's for its 32-layer LLM, unscaled on the 30-layer
one here.

Why the defaults: the reference's budget of 192 and its layers, so that a user gets the paper's
setting unless they choose otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...core import Reduction
from ...core.matching import ranks
from ..options import Option
from ..registry import register
from .base import VisualInput, VisualMethod, merge_into, question_attention, top_count

#: the reference's visual tokens left after each stage, by its budget (of 576)
REFERENCE_COUNTS = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}
#: the same from no token to every token, the points the stages interpolate between
SCHEDULE = [(0, (0, 0, 0)), *sorted(REFERENCE_COUNTS.items()), (576, (576, 576, 576))]
RECYCLED = 0.3  # share of a stage's removed tokens that are recycled
PER_CLUSTER = 10  # recycled tokens per cluster


@register
class SparseVLM(VisualMethod):
    name = "sparsevlm"
    paper = (
        "Zhang et al. 2024, SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model "
        "Inference"
    )
    placement = "llm"
    prunes = True
    needs = frozenset({"text_attention"})

    keep: float = VisualMethod.keep.but(192 / 576)  # the reference's budget, 192 of 576
    layers: tuple[int, int, int] = Option((3, 7, 16), "the three LLM layers entered reduced")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if (
            len(self.layers) != 3
            or any(isinstance(n, bool) or not isinstance(n, int) for n in self.layers)
            or list(self.layers) != sorted(set(self.layers))
            or self.layers[0] < 1
        ):
            raise ValueError(
                "sparsevlm: layers must be three increasing ints >= 1 (the reference's 3, 7, 16), got "
                f"{self.layers!r}"
            )
        self.layer = self.layers[0]

    def stages(self) -> list[tuple[int, float]]:
        at = self.keep * 576
        hi = next(i for i, (budget, _) in enumerate(SCHEDULE) if budget >= at - 1e-9)
        (b0, c0), (b1, c1) = SCHEDULE[max(hi - 1, 0)], SCHEDULE[hi]
        t = 1.0 if b1 == b0 else min(1.0, (at - b0) / (b1 - b0))
        return [(layer, ((1 - t) * c0[i] + t * c1[i]) / 576) for i, layer in enumerate(self.layers)]

    def decide(self, inp: VisualInput) -> Reduction:
        relevance = (inp.text_attention * inp.visual[:, None, :]).sum(-1)  # (B, Q) attention on the image
        asked = inp.question_mask
        mean = (relevance * asked).sum(1, keepdim=True) / asked.sum(1, keepdim=True).clamp_min(1)
        top = relevance.masked_fill(~asked, -torch.inf).amax(1, keepdim=True)
        score = question_attention(inp, rows=relevance >= torch.minimum(mean, top))  # the top one at least

        n = inp.visual.sum(1)
        removed = n - inp.keep
        clusters = torch.where(removed > 0, (torch.floor(RECYCLED * removed) + 1) // PER_CLUSTER + 1, 0)
        clusters = torch.minimum(clusters, (inp.keep - 1).clamp_min(0)).long()
        kept = top_count(score, inp.visual, inp.keep - clusters)
        pruned = inp.visual & ~kept
        recycled_n = torch.where(clusters > 0, torch.floor(RECYCLED * pruned.sum(1)) + 1, 0).long()
        recycled = top_count(score, pruned, recycled_n)
        centres, target = density_peaks(inp.x, recycled, clusters)
        return merge_into(kept | centres, torch.where(recycled, target, -1), inp)


def density_peaks(x: Tensor, members: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """DPC-kNN clustering of each row's members (B, N) into `count` (B,) clusters, on features x
    (B, N, C): density exp(-mean squared distance to the k = count nearest members), a member's
    separation its distance to the nearest denser member (the largest distance for the densest), the
    `count` members of highest density x separation the centres; every member joins its nearest
    centre. Returns the centres (B, N) and each token's centre index (B, N)."""
    pair = members[:, :, None] & members[:, None, :]
    dist = torch.cdist(x.float(), x.float()) / x.shape[-1] ** 0.5
    far = dist.masked_fill(~pair, 0).flatten(1).amax(-1)[:, None, None]
    dist = dist.masked_fill(~pair, torch.inf)
    k = int(count.max().clamp_min(1))
    nearest = dist.topk(k, dim=-1, largest=False).values.clamp_max(far)  # inf -> far, masked below
    within = torch.arange(k, device=x.device) < count[:, None, None]
    density = (-(nearest.square() * within).sum(-1) / count.clamp_min(1)[:, None]).exp()
    _, rank = ranks(density.masked_fill(~members, -torch.inf))  # ties: the later token ranks denser
    denser = rank[:, None, :] > rank[:, :, None]
    separation = torch.where(denser & pair, dist, far).amin(-1)
    centres = top_count(separation * density, members, count)
    target = dist.masked_fill(~centres[:, None, :], torch.inf).argmin(-1)
    return centres, torch.where(centres, torch.arange(x.shape[1], device=x.device), target)
