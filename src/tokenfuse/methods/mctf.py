"""MCTF: Lee et al., "Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision
Transformers", CVPR 2024. Training-free part only.

Faithful (the reference code's evaluation settings): every A-B pair of the alternating split gets one
score, the product of three criteria each raised to 1 / tau: similarity, (cos + 1) / 2 of the hidden
states (tau_sim = 1); informativeness, the inverse of the attention each of the two tokens receives,
averaged over heads and queries, so rarely attended tokens fuse first (tau_info = 20); size, the
inverse of each token's size, so small tokens fuse first (tau_size = 40). A tau of 0 turns its
criterion off, as in the reference. Matching is bidirectional: r // 2 A-tokens merge into their best
B-token, then r - r // 2 B-tokens, with what they just took in, into their best still unmerged
A-token, on the same scores. Fusion is the size-weighted average, with proportional attention.
Deviations: the paper scores informativeness by one-step-ahead attention, the attention of the layer
about to process the tokens. tokenfuse reduces between a layer's attention and its MLP, where the
next layer's attention does not exist yet (computing it would cost another attention), so this uses
the attention received in the layer that just ran: the paper's ablation without one-step-ahead
attention (one_step_ahead=0 in the reference code). It is estimated from at most `queries` queries
per sequence, evenly spaced over its real tokens ([CLS] included), for O(H * queries * N * D) work
where the full map costs O(H * N^2 * D); it is exact for sequences of up to `queries` tokens. The
default of 8 queries gives the same cosine to the full model as 16 or all of them (all-MiniLM-L6-v2,
BBC News, keep 0.5 and 0.35) for less scoring time. The
paper's fine-tuning (and its distillation) is left out: tokenfuse is training-free. The reference
divides each criterion by its maximum over the sequence; that scales all of a sequence's scores
alike and changes no choice, so it is left out. r is split per sequence, and one side takes up what
the other cannot, so that exactly `remove` tokens go whenever the two steps allow it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..core import Reduction, attention_probs
from ..core.matching import alternate, bipartite_merge, ranks
from .base import LayerInput, Method
from .registry import register

FUSIONS = ("size", "attention")  # how a merge group's features are averaged


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
        fusion: str = "size",
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
            a, b = alternate(metric)
            sim = (a @ b.transpose(1, 2)).float().add_(1).mul_(0.5)
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
