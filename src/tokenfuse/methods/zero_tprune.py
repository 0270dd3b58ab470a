"""Zero-TPrune: Wang, Dedhia and Jha, "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the
Attention Graph in Pre-Trained Transformers", CVPR 2024.

Faithful: the layer's attention (per head, queries to keys) is a weighted directed graph, and a
token is important if important tokens attend to it: Weighted PageRank, s <- A^T s from a uniform
start, per head, until it converges or for at most 30 iterations in the first three layers, 5 in
the middle ones and 1 in the last three (the paper's budget). Heads are combined by the paper's
EIR aggregation (root mean square, so a token salient in a few heads is not averaged away) over
the heads its variance-based filter keeps (score variance, relative to a uniform score, within
[0.01, 0.7]; if no head qualifies, all count). A pruning step runs in the paper's I'-S-I order: a
one-iteration pre-ranking splits the movable tokens into the less important half (A) and the rest
(B); the S-stage drops the A-tokens whose best cosine match in B is highest (dropped, not merged);
then the I-stage reruns PageRank on the graph of the tokens left and drops the least important.
Keys (averaged over heads) are the similarity, as the paper chose by ablation; the hidden states
(`similarity="hidden"`, what tokenfuse's ToMe defaults to) are an option.
Deviations: the initial score is uniform (the paper's "Zero-TPrune-uni"): the paper's default gives
[CLS] sqrt(N) times the start score, which serves a [CLS] classifier, not a mean-pooled encoder.
[CLS], [SEP] and caller-protected tokens vote and receive votes but are never candidates, on either
side of the S-stage. The stages share each step's budget: `similar_fraction` of it goes to the
S-stage, at most the size of A, and the I-stage removes the rest, so each sequence loses exactly
what the schedule asks. In the I-stage each query's attention is renormalised over the tokens left,
as the softmax would be. The
paper does not say on what scale the filter's variance band applies; here it is the variance of
N times the scores (1 = uniform), so on text most heads of the later layers, which pile their
score on [CLS] and [SEP], fall outside it and all heads count there.
The paper's code is not released; its weighted PageRank, root-mean-square aggregation and I-stage
ranking equal the first author's earlier course-project code (Hongjiew/Transformer_pruning), which
has no S-stage, head filter or per-depth iteration budget (tests/test_authors_token_methods.py).
Cost: PageRank reads the full (B, H, N, N) attention map once per iteration, O(H N^2) each, on top
of the O(H N^2 D) of recomputing the map; the scoring is inherently quadratic in N.

Why the defaults: keys as the paper chose (hidden states do as well on a mean-pooled encoder), and
an even split of the budget between the stages, the best of the splits tried on text (README, "Why
the defaults").
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ..core import Reduction
from ..core.matching import ranks
from .base import LayerInput, Method
from .options import Option
from .registry import register

#: the variance-based head filter's band, on scores relative to uniform (paper: [0.01, 0.7])
HEAD_VARIANCE = (0.01, 0.7)
#: PageRank stops for a sequence once no score moves by more than this, relative to uniform
TOLERANCE = 1e-4


def _steps(point: int, num_layers: int) -> int:
    """The paper's iteration budget: convergence is slow in early layers, immediate in late ones."""
    layer = point - 1
    if layer < 3:
        return 30
    return 1 if layer >= num_layers - 3 else 5


def _pagerank(attn: Tensor, alive: Tensor, steps: int) -> Tensor:
    """Per-head scores (B, H, N) of s <- A^T s over the alive tokens, from a uniform start.

    Tokens not alive (padding, dropped) neither vote nor receive votes, and each query's attention
    is renormalised over the alive keys, so a sequence is scored the same alone or padded. A
    sequence whose scores have converged is frozen, so its result does not depend on its batch.
    """
    a = alive.to(attn.dtype)[:, None, :]
    count = a.sum(-1, keepdim=True)
    mass = (attn @ a[..., None]).squeeze(-1)
    share = a / mass.clamp_min(torch.finfo(attn.dtype).tiny)
    s = (a / count.clamp_min(1.0)).expand_as(mass)
    done = torch.zeros_like(count, dtype=torch.bool)
    for _ in range(steps):
        nxt = ((s * share)[..., None, :] @ attn).squeeze(-2) * a
        nxt = torch.where(done, s, nxt)
        done = done | ((nxt - s).abs().amax(dim=(1, 2), keepdim=True) * count < TOLERANCE)
        s = nxt
        if bool(done.all()):
            break
    return s


def _importance(s: Tensor, alive: Tensor) -> Tensor:
    """(B, N) importance: EIR (root mean square over heads) of the heads the variance filter keeps."""
    count = alive.sum(-1)[:, None].to(s.dtype)
    relative = s * count[..., None]  # mean 1 over the alive tokens
    var = ((relative - 1.0).square() * alive[:, None, :]).sum(-1) / count.clamp_min(1.0)
    use = (var >= HEAD_VARIANCE[0]) & (var <= HEAD_VARIANCE[1])
    use = (use | ~use.any(-1, keepdim=True)).to(s.dtype)
    return ((s.square() * use[..., None]).sum(1) / use.sum(-1, keepdim=True)).sqrt()


@register
class ZeroTPrune(Method):
    name = "zero-tprune"
    paper = (
        "Wang, Dedhia and Jha, Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention "
        "Graph in Pre-Trained Transformers, CVPR 2024"
    )
    needs = frozenset({"attention"})
    prunes = True

    similarity: Literal["keys", "hidden"] = Option("keys", "what the S-stage compares tokens on")
    similar_fraction: float = Option(0.5, "share of each step's budget the S-stage removes", "[0, 1]")
    iterations: int | None = Option(None, "PageRank iterations; None: the paper's per depth", "[1, inf)")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.needs = frozenset({"attention"} if self.similarity == "keys" else {"attention", "hidden"})

    def decide(self, inp: LayerInput) -> Reduction:
        tokens = inp.tokens
        real, movable = tokens.mask, tokens.mask & ~tokens.protected
        attn = inp.attention().float()
        n_movable = movable.sum(-1)
        n_similar = torch.minimum((inp.remove * self.similar_fraction + 0.5).floor().long(), n_movable // 2)
        n_important = torch.minimum(inp.remove - n_similar, n_movable - n_similar).clamp_min(0)

        # I'-stage: one vote on the whole graph ranks the tokens for the S-stage's partition.
        pre = _importance(_pagerank(attn, real, 1), real)
        dropped = self._similar(inp, pre, movable, n_similar)

        # I-stage: PageRank on the graph of the tokens left; the least important go.
        alive = real & ~dropped
        steps = self.iterations or _steps(inp.point, inp.num_layers)
        score = _importance(_pagerank(attn, alive, steps), alive)
        candidate = movable & alive
        _, rank = ranks(score.masked_fill(~candidate, torch.inf))
        dropped = dropped | (candidate & (rank < n_important[:, None]))

        n = real.shape[1]
        own = torch.arange(n, device=real.device).expand_as(dropped)
        return Reduction.hard(torch.where(dropped, -1, own))

    def _similar(self, inp: LayerInput, pre: Tensor, movable: Tensor, n_similar: Tensor) -> Tensor:
        """S-stage: (B, N) mask of the A-tokens (less important half) most alike to a B-token."""
        dropped = torch.zeros_like(movable)
        n_movable = movable.sum(-1)
        n_a = n_movable // 2
        if not bool((n_similar > 0).any()):
            return dropped
        # Movable tokens by rising importance (A first, then B), the rest after them.
        order, _ = ranks(pre.masked_fill(~movable, torch.inf))
        width, a_width = int(n_movable.max()), int(n_a.max())
        metric = inp.keys() if self.similarity == "keys" else inp.x
        metric = metric.gather(1, order[:, :width, None].expand(-1, -1, metric.shape[-1]))
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        sim = metric[:, :a_width] @ metric.transpose(1, 2)  # (B, |A|, |A| + |B|)
        slot = torch.arange(width, device=sim.device)
        in_b = (slot >= n_a[:, None]) & (slot < n_movable[:, None])
        best = sim.masked_fill(~in_b[:, None, :], -torch.inf).amax(-1)
        best = best.masked_fill(slot[None, :a_width] >= n_a[:, None], -torch.inf)
        _, rank = ranks(best.float(), descending=True)
        chosen = (rank < n_similar[:, None]) & (best > -torch.inf)
        return dropped.scatter_(1, order[:, :a_width], chosen)
