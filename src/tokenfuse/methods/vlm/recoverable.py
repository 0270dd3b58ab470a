"""Recoverable Compression (Chen et al., "Recoverable Compression: A Multimodal Vision Token Recovery
Mechanism Guided by Text Information", AAAI 2025; reference code banjiuyufen/Recoverable-Compression).

Faithful, the paper's three steps in its order: visual filter (the tokens of highest [CLS] attention
kept), text information recovery (of the rest, the tokens most similar to the question recovered),
secondary recovery (of what is left, the tokens of highest [CLS] attention become cluster centres,
every other token merges into the centre whose key it is most cosine-similar to, a k-NN assignment on
the tower's keys as in the reference); kept and recovered tokens stay in their original order. An
image without a question recovers by [CLS] attention (nothing to match); one whose count is too small
for a centre drops the rest.

Deviations: the paper sizes each step per image with a Local Outlier Factor threshold; here each image
keeps exactly its count, split by `recover` and `clusters` (shares of the count for the recovered
tokens and the cluster centres, our choice; the visual filter takes the rest). The text score is the
cosine between the projected visual tokens and the question's token embeddings (both in the LLM's
input space), the best over the question tokens; the reference compares CLIP's projected patch
features with a CLIP text encoder's sentence embedding of the question, a second model this library
does not load. A cluster is the size-weighted average of its members, as the paper's "merge each
cluster into a single token"; the reference code instead adds to each centre the [CLS]-attention-
weighted sum of its 32 nearest tokens (clusters overlapping, the question score added to the
distance) and appends one more token summing the rest, which no survivor's slot can hold; here the
clusters sit at their centres' positions, the reference's after the kept tokens (and it gathers the
keys with indices counted among the tokens left, not among all patches). [CLS]
attention is the tower's at the selected layer, mean over heads (the reference: one full-width head
of the last layer).

Why the defaults: keep 0.1 is about the paper's average; recover and clusters split a quarter each,
an even choice of ours, not tuned (the paper sizes them per image).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...core import Reduction
from ..options import Option
from ..registry import register
from .base import VisualInput, VisualMethod, merge_into, top_count


@register
class RecoverableCompression(VisualMethod):
    name = "recoverable"
    paper = (
        "Chen et al. 2024, Recoverable Compression: A Multimodal Vision Token Recovery Mechanism "
        "Guided by Text Information (AAAI 2025)"
    )
    placement = "boundary"
    needs = frozenset({"cls_attention", "keys", "projected", "question"})

    keep: float = VisualMethod.keep.but(0.1)  # the paper averages about 10%
    recover: float = Option(0.25, "share of the kept count recovered by the question", "[0, 1)")
    clusters: float = Option(0.25, "share of the kept count that are cluster centres", "[0, 1)")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.recover + self.clusters >= 1:
            raise ValueError(
                "recoverable: recover + clusters must leave a share for the visual filter, "
                f"got {self.recover + self.clusters}"
            )

    def decide(self, inp: VisualInput) -> Reduction:
        recovered_n = torch.floor(inp.keep * self.recover).long()
        centres_n = torch.floor(inp.keep * self.clusters).long()
        kept = top_count(inp.cls_attention, inp.visual, inp.keep - recovered_n - centres_n)

        visual = F.normalize(inp.projected, dim=-1)
        words = F.normalize(inp.question, dim=-1)
        match = (visual @ words.transpose(1, 2)).masked_fill(~inp.question_mask[:, None, :], -torch.inf)
        match = F.pad(match, (0, 1), value=-torch.inf).amax(-1)  # the pad: a batch without questions
        # an image without a question recovers by [CLS] attention: there is nothing to match
        match = torch.where(inp.question_mask.any(-1, keepdim=True), match, inp.cls_attention)
        kept |= top_count(match, inp.visual & ~kept, recovered_n)

        rest = inp.visual & ~kept
        centres = top_count(inp.cls_attention, rest, centres_n)
        keys = F.normalize(inp.keys, dim=-1)
        near = (keys @ keys.transpose(1, 2)).masked_fill(~centres[:, None, :], -torch.inf).argmax(-1)
        # a row without centres (a count too small to share) drops its rest
        target = torch.where(centres.any(-1, keepdim=True), near, -1)
        return merge_into(kept | centres, target, inp)
