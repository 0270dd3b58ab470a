"""Random merging: the baseline every method must beat (the random ablation of the ToMe paper).

The same bipartite matching and schedule as ToMe, with scores drawn at random instead of from
similarity, so it isolates what the method's choice of tokens is worth. Scores are a hash of the
token positions, layer and seed: reproducible, and the same for a sequence alone or in a batch.

Why the defaults: seed 0 is any fixed seed: the baseline is the same on every run.
"""

from __future__ import annotations

import torch

from ..core import Reduction
from ..core.matching import bipartite_merge
from .base import LayerInput, Method
from .options import Option
from .registry import register


def _hash_scores(n_a: int, n_b: int, salt: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(n_a, device=device, dtype=torch.int64)[:, None]
    j = torch.arange(n_b, device=device, dtype=torch.int64)[None, :]
    h = (i * 0x2545F491 + j * 0x4F6CDD1D + salt * 0x1B873593) & 0xFFFFFFFF
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return (h ^ (h >> 16)).to(torch.float32) / 2**32


@register
class RandomMerge(Method):
    name = "random"
    paper = "baseline: random pairs merged on ToMe's schedule (Bolya et al., ICLR 2023, ablation)"
    max_removal = 0.5  # one token per A-token

    seed: int = Option(0, "the random scores' seed")

    def decide(self, inp: LayerInput) -> Reduction:
        n = inp.x.shape[1]
        scores = _hash_scores((n + 1) // 2, n // 2, self.seed * 1009 + inp.point, inp.x.device)
        return bipartite_merge(scores.expand(inp.x.shape[0], -1, -1), inp.tokens, inp.remove)
