"""Pooling baseline: merge adjacent tokens in windows of two, spread evenly along the sequence.

The simplest structured reduction (average pooling over neighbours), which published comparisons
find hard to beat; a method that scores tokens must do better than this to earn its cost. Each
even position may merge with its right neighbour; which pairs merge first follows the bit-reversed
pair index, so any number of merges is spread evenly over the sequence, the same way alone or in
a padded batch. Repeated over reduction points, windows grow to 4, 8, ... tokens.

Why the defaults: no options of its own; the budget and schedule are the engine's, as for every
method.
"""

from __future__ import annotations

import torch

from ..core import Reduction
from ..core.matching import bipartite_merge
from .base import LayerInput, Method
from .registry import register

BITS = 16


def _bit_reversed(n: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    out = torch.zeros_like(i)
    for bit in range(BITS):
        out |= ((i >> bit) & 1) << (BITS - 1 - bit)
    return out


@register
class Pool(Method):
    name = "pool"
    paper = "baseline: average pooling of adjacent token pairs, spread evenly"
    max_removal = 0.5  # one token per pair

    def decide(self, inp: LayerInput) -> Reduction:
        n = inp.x.shape[1]
        n_a, n_b = (n + 1) // 2, n // 2
        priority = 1.0 - _bit_reversed(n_a, inp.x.device).float() / 2**BITS
        scores = torch.full((n_a, n_b), -torch.inf, device=inp.x.device)
        pairs = torch.arange(min(n_a, n_b), device=inp.x.device)
        scores[pairs, pairs] = priority[pairs]  # position 2i merges into 2i + 1 only
        return bipartite_merge(scores.expand(inp.x.shape[0], -1, -1), inp.tokens, inp.remove)
