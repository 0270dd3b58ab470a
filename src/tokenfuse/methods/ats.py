"""ATS: Fayyaz et al., "Adaptive Token Sampling for Efficient Vision Transformers", ECCV 2022.

Faithful: each token's significance is the [CLS] attention to it times the norm of its value
vector, normalised over the candidates; the scores are sorted, their cumulative distribution is
sampled at the paper's deterministic points r = 1/2K, 3/2K, ..., (2K-1)/2K, each point picks the
token with the nearest CDF value (as the paper's text and reference code do), and a token picked
several times is kept once, so an input keeps fewer than K tokens when its attention is
concentrated and up to K when it is flat. Dropped tokens leave (no fusion), and dropping tokens
right after the attention equals the paper's keeping of the sampled tokens' attention rows only.
Deviations: the paper places ATS in chosen stages of a DeiT classifier with a fixed K per stage;
here it runs at every reduction point of the schedule with K = count - remove - protected, so no
input keeps more than the budget. The reference code samples a fixed number of points (DeiT's
196 tokens) and min-max rescales the CDF; the paper's K midpoints on the plain CDF are used
instead. [CLS], [SEP] and caller ids are never candidates, and a sequence asked to lose nothing
keeps everything (so it is reduced the same alone or in a batch). On a mean-pooled text encoder
the [CLS] row is only a proxy for what the pooled output needs, and dropped tokens leave the mean.

Why the defaults: ATS has no options of its own; the budget and schedule are the engine's, as for
every method (half the work, a geometric schedule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import Reduction
from .base import LayerInput, Method
from .registry import register


def _samples_below(x: Tensor, k: Tensor) -> Tensor:
    """How many of the points (2i + 1) / 2k, i < k, are <= x (x: (B, N), k: (B, 1))."""
    return torch.floor(x * k + 0.5).clamp(min=0).minimum(k)


@register
class ATS(Method):
    name = "ats"
    paper = "Fayyaz et al., Adaptive Token Sampling for Efficient Vision Transformers, ECCV 2022"
    needs = frozenset({"cls_attention", "values"})
    prunes = True
    adaptive = True

    def decide(self, inp: LayerInput) -> Reduction:
        tokens = inp.tokens
        cand = tokens.mask & ~tokens.protected
        score = (inp.cls_attention() * inp.value_norms()).float().masked_fill(~cand, 0.0)
        score = score / score.sum(-1, keepdim=True).clamp_min(torch.finfo(score.dtype).tiny)

        # Candidates in ascending significance after every non-candidate (stable: ties keep order).
        order = torch.where(cand, score, -1.0).argsort(dim=-1, stable=True)
        sorted_cand = cand.gather(1, order)
        cdf = score.gather(1, order).cumsum(-1)
        # A sample goes to the nearest CDF value (ties to the lower one): token j owns the points
        # in ((c[j-1] + c[j]) / 2, (c[j] + c[j+1]) / 2]; the ends are open.
        prev = F.pad(cdf[:, :-1], (1, 0))
        prev_cand = F.pad(sorted_cand[:, :-1], (1, 0))
        lo = torch.where(prev_cand, (prev + cdf) / 2, -1.0)
        hi = F.pad((cdf[:, :-1] + cdf[:, 1:]) / 2, (0, 1), value=2.0)

        k = (tokens.count - tokens.protected.sum(-1) - inp.remove).clamp_min(0)[:, None].float()
        hit = _samples_below(hi, k) > _samples_below(lo, k)
        keep = torch.zeros_like(cand).scatter_(1, order, sorted_cand & hit)
        keep |= (inp.remove <= 0)[:, None]  # nothing asked: reduce as it would be alone (not at all)

        n = cand.shape[1]
        own = torch.arange(n, device=cand.device).expand_as(cand)
        return Reduction.hard(torch.where(cand & ~keep, -1, own))
