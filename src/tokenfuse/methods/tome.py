"""ToMe: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023.

Faithful: bipartite soft matching on an alternating split (even positions A, odd B), each A-token's
best B-partner by cosine similarity, the most similar edges merged by size-weighted average,
protected tokens ([CLS]) never merged, proportional attention (log size on the attention logits),
merging between a layer's attention and its MLP. With similarity="keys", order="reference" and a
schedule that removes a constant count per layer it computes what the reference code
(facebookresearch/ToMe, tome/patch/timm.py) computes on a seeded timm DeiT-S, to rounding
(tests/test_tome_reference_timm.py).

Deviations: the similarity source is an option; the paper matches on attention keys averaged over
heads ("keys"), the default is the hidden states the layer is about to pass on. order: the reference
lays the tokens out after each merge as [CLS], the unmerged A-tokens, then the B-tokens, so the next
split pairs other tokens; "original" keeps them where the model put them. The default schedule keeps
a constant fraction of tokens instead of merging a constant count (core.schedule; a constant count is
an explicit schedule). Equal scores rank by position (the reference's sort is not stable). Besides a
leading [CLS], protected tokens that close a sequence ([SEP]) and caller-protected ones stay whole.

Why the defaults: hidden states match far better than keys on a mean-pooled text encoder, and the two
orders are within noise, "original" marginally closer to the full model (README, "Why the defaults").
"""

from __future__ import annotations

from typing import Any, Literal

from ..core import Reduction
from ..core.matching import cosine_partners, merge_best
from .base import LayerInput, Method
from .options import Option
from .registry import register


@register
class ToMe(Method):
    name = "tome"
    paper = "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023"
    max_removal = 0.5  # one token per A-token

    similarity: Literal["hidden", "keys"] = Option("hidden", "what tokens are matched on")
    order: Literal["original", "reference"] = Option("original", "token layout after a merge")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.needs = frozenset({self.similarity})

    def decide(self, inp: LayerInput) -> Reduction:
        metric = inp.keys() if self.similarity == "keys" else inp.x
        return merge_best(*cosine_partners(metric, inp.tokens), inp.tokens, inp.remove, self.order)
