"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

Faithful: after LLM layer K - 1, the visual tokens are ranked by the attention the last prompt token
pays them at that layer, averaged over heads, and all but the top fraction are dropped for every later
layer (defaults K = 2, keep 0.5, the paper's K=2 R=50%); layers before K see every token, positions of
the kept tokens are unchanged. Deviation: the scores come from the layer's own queries and keys
recomputed for the last row only (the reference runs that layer with eager attention to read the whole
map); the ranking is the same. The KV cache holds the reduced prefix for decoding, as in the paper's
inference setting.

Why the defaults: they are the paper's headline setting, K = 2 and R = 50%.
"""

from __future__ import annotations

from ...core import Reduction
from ..options import Option
from ..registry import register
from .base import VisualInput, VisualMethod, prune_to, top_keep


@register
class FastV(VisualMethod):
    name = "fastv"
    paper = "Chen et al. 2024, An Image is Worth 1/2 Tokens After Layer 2 (FastV)"
    placement = "llm"
    prunes = True
    needs = frozenset({"last_attention"})

    keep: float = VisualMethod.keep.but(0.5)
    layer: int = Option(2, "the LLM layer entered reduced", "[1, inf)")

    def decide(self, inp: VisualInput) -> Reduction:
        return prune_to(top_keep(inp.last_attention, inp), inp)
