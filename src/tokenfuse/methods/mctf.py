"""MCTF: Lee et al., "Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision
Transformers", CVPR 2024. Training-free part only.

Faithful (the reference code's evaluation settings, but for the fusion's default): every A-B pair
of the alternating split gets one score, the product of three criteria each raised to 1 / tau:
similarity, (cos + 1) / 2 of the hidden states (tau_sim); informativeness, the inverse of the
attention each of the two tokens receives, averaged over heads and queries (tau_info); size, the
inverse of each token's size (tau_size). A tau of 0 turns its criterion off, as in the reference.
Matching is bidirectional: r // 2 A-tokens merge into their best B-token, then r - r // 2 B-tokens,
with what they just took in, into their best still unmerged A-token, on the same scores.
Proportional attention throughout. `fusion`: "attention" is the reference's evaluation setting
(pooling_type=1), a group's feature averaged by the attention each member receives times its size;
"size" is ToMe's size-weighted average (pooling_type=0). Reading every query, the merge groups and
tokens equal the reference's to rounding (tests/test_authors_token_methods.py).

Deviations: where tokens merge. The reference merges at a block boundary, before layer l's attention
with one-step-ahead attention (its evaluation setting) or after layer l's MLP without it; tokenfuse
reduces between a layer's attention and its MLP with the attention of the layer that just ran. No
tokenfuse point is equivalent: the MLP is not affine, and merging at the next point would let that
attention run on every token. One-step-ahead attention would need the next layer's attention before
it runs, which a hook cannot do without replacing the host's attention. The attention received is
estimated from at most `queries` queries per sequence, evenly spaced over its real tokens ([CLS]
included): O(H * queries * N * D) instead of the full map's O(H * N^2 * D), exact up to `queries`
tokens. The paper's fine-tuning and distillation are left out. The reference divides each criterion by
its maximum over the sequence and sizes by their maximum in the fusion, which changes no choice and is
left out; attention fusion scales each group's weights by its largest (no average changes) so they
stay representable in half precision. r is split per sequence, one side taking up what the other
cannot, so exactly `remove` tokens go whenever the two steps allow it.

Why the defaults: size fusion is even with attention fusion at half the work and clearly better at
smaller budgets, and 8 queries stay as close to the full model as more of them for less scoring
time (README, "Why the defaults").
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ..core import Reduction, attention_probs
from ..core.matching import alternate, alternate_scores, bipartite_merge, ranks
from .base import LayerInput, Method
from .options import Option
from .registry import register

Fusion = Literal["size", "attention"]  # how a merge group's features are averaged


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

    tau_sim: float = Option(1.0, "similarity's temperature; 0 turns it off", "[0, inf)")
    tau_info: float = Option(20.0, "informativeness's temperature; 0 turns it off", "[0, inf)")
    tau_size: float = Option(40.0, "size's temperature; 0 turns it off", "[0, inf)")
    bidirectional: bool = Option(True, "merge A into B, then B into the A-tokens left")
    queries: int = Option(8, "queries the attention received is estimated from", "[1, inf)")
    fusion: Fusion = Option("size", "how a merge group's features are averaged")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        reads_attention = self.tau_info > 0 or self.fusion == "attention"
        self.needs = frozenset({"hidden", "attention"} if reads_attention else {"hidden"})
        # Both directions can merge all but one movable token; A into B alone one per A-token.
        self.max_removal = 1.0 if self.bidirectional else 0.5

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
