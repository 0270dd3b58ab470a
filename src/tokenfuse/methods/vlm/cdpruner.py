"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs", NeurIPS 2025; reference code Theia-4869/CDPruner, `encode_images` in
llava/model/llava_arch.py).

Faithful: a determinantal point process over each image's visual tokens with the instruction-
conditioned kernel L = diag(r) S diag(r): S the cosine similarity of the projected tokens (after the
projector), r each token's relevance, the negated mean cosine between the token and the instruction's
embeddings (the reference's sign), min-max normalised as the reference does ((r - min + 1e-6) /
(max - min)). The kept set is the DPP's greedy MAP estimate by the fast incremental Cholesky update
(Chen et al., NeurIPS 2018): each step takes the token of largest remaining gain (ties to the earlier
token); kept tokens stay in patch order, the rest are dropped. Given the same inputs, an image alone
gets the reference's selection exactly (tests/data/fixtures/cdpruner.pt).
Deviations: the reference normalises relevance over the whole batch, so an image's selection depends
on its batch neighbours; here over each image's own tokens, so an image is pruned alike alone or in
any batch. Relevance is taken in the LLM's input space (projected tokens against the input embeddings
of the question tokens, mean over them); the reference compares the tower's CLIP-projected patch
features with a CLIP text encoder's embedding of the question, a second model this library does not
load. An image without a question gets a constant relevance (plain diversity, S alone). Past the
kernel's rank (more tokens kept than feature dimensions) the gains left are rounding noise: the
reference goes on dividing by their roots, can turn NaN and take a token twice (keeping fewer); here a
gain below MIN_GAIN updates nothing and the rest are taken by their remaining gains, all distinct.
Counts are tokenfuse's, ceil(keep x tokens).

Why the defaults: keep 0.25, 144 of LLaVA-1.5's 576 tokens, a budget its paper reports among others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import Reduction
from ..registry import register
from .base import VisualInput, VisualMethod, prune_to

MIN_GAIN = 1e-10  # below it a gain is rounding noise: the kernel's rank is spent


def relevance(embeds: Tensor, text: Tensor, text_mask: Tensor, candidate: Tensor) -> Tensor:
    """(B, N) each token's relevance to its row's text, min-max normalised over the row's candidates
    (rows independent). embeds: (B, N, C) tokens; text: (B, M, C) the row's text embeddings, valid
    where text_mask (B, M); candidate: (B, N) bool. A row without text, or with equal scores, gets 1."""
    cosine = F.normalize(embeds.float(), dim=-1) @ F.normalize(text.float(), dim=-1).transpose(1, 2)
    words = text_mask.sum(1, keepdim=True)
    score = (-cosine).masked_fill(~text_mask[:, None, :], 0).sum(-1) / words.clamp_min(1)
    low = score.masked_fill(~candidate, torch.inf).amin(1, keepdim=True)
    high = score.masked_fill(~candidate, -torch.inf).amax(1, keepdim=True)
    spread = high - low
    scaled = (score - low + 1e-6) / torch.where(spread > 0, spread, 1)
    return torch.where((words > 0) & (spread > 0), scaled, 1.0).masked_fill(~candidate, 0)


def conditional_kernel(features: Tensor, relevance: Tensor) -> Tensor:
    """(B, N, N) L = diag(r) S diag(r), S the cosine similarity of features (B, N, C), r: (B, N)."""
    unit = F.normalize(features.float(), dim=-1)
    return relevance[:, :, None] * (unit @ unit.transpose(1, 2)) * relevance[:, None, :]


def greedy_map(kernel: Tensor, candidate: Tensor, count: Tensor) -> Tensor:
    """(B, N) bool: the DPP's greedy MAP set of `count` (B,) candidates (B, N) per row under the kernel
    (B, N, N), by the incremental Cholesky update: c_i holds the new Cholesky row of each token, d^2 the
    log-determinant gain of adding it."""
    rows = torch.arange(kernel.shape[0], device=kernel.device)
    steps = int(count.max()) if count.numel() else 0
    cis = kernel.new_zeros(steps, *candidate.shape)
    gain = torch.diagonal(kernel, dim1=1, dim2=2).masked_fill(~candidate, -torch.inf)
    chosen = torch.zeros_like(candidate)
    for i in range(steps):
        pick = gain.argmax(-1)
        chosen[rows, pick] |= i < count  # rows already full choose nothing more
        projection = torch.einsum("tb,tbn->bn", cis[:i, rows, pick], cis[:i])
        best = gain[rows, pick]
        eis = (kernel[rows, pick] - projection) / best.clamp_min(MIN_GAIN).sqrt()[:, None]
        eis = torch.where(best[:, None] > MIN_GAIN, eis, 0)  # rank spent: the gains stay as they are
        cis[i] = eis
        gain = (gain - eis.square()).masked_fill(chosen | ~candidate, -torch.inf)
    return chosen


@register
class CDPruner(VisualMethod):
    name = "cdpruner"
    paper = (
        "Zhang et al. 2025, Beyond Attention or Similarity: Maximizing Conditional Diversity for Token "
        "Pruning in MLLMs"
    )
    placement = "boundary"
    prunes = True
    needs = frozenset({"projected", "question"})

    def decide(self, inp: VisualInput) -> Reduction:
        r = relevance(inp.projected, inp.question, inp.question_mask, inp.visual)
        return prune_to(greedy_map(conditional_kernel(inp.projected, r), inp.visual, inp.keep), inp)
