"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
CVPR 2025; reference code dvlab-research/VisionZip).

Faithful: each image keeps its dominant tokens, those of highest [CLS] attention at the selected tower
layer (mean over heads: the reference's sum ranks the same), unchanged; of the rest, `contextual`
evenly spaced ones (every (rest // contextual)-th, counted in patch order from the first) become
targets, and every other token merges whole into the target its head-averaged key at the selected
layer is most cosine-similar to (ties to the earlier target). The split defaults to the paper's 54
dominant + 10 contextual for 64 (108 + 20, 162 + 30).
Deviations: the reference spends one dominant slot on the [CLS] token itself (53 patches + [CLS] for
54); at this boundary [CLS] has been dropped (LLaVA-1.5), so every dominant slot goes to a patch. A
contextual token is the size-weighted average of its target and the tokens merged into it (the
engine's merge, merge="weighted", the default); merge="authors"
gives the reference's target + the plain mean of the tokens merged into it, a sum no average gives
(Reduction.gain doubles the equal-weight average of the target and that mean). Tokens stay in patch
order; order="reference" lays them out as the reference does, dominant tokens first.

Why the defaults: the paper's 54 + 10 split; merge="weighted" keeps a merged token at the scale of
the tokens it stands for, and answered better than "authors" on the packaged VLM (README, "Why the
defaults").
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F

from ...core import Reduction
from ..options import Option
from ..registry import register
from .base import VisualInput, VisualMethod, merge_into, top_keep


@register
class VisionZip(VisualMethod):
    name = "visionzip"
    paper = "Yang et al. 2025, VisionZip: Longer is Better but Not Necessary in Vision Language Models"
    placement = "boundary"
    needs = frozenset({"cls_attention", "keys"})

    contextual: float = Option(10 / 64, "share of the kept tokens that are merged targets", "[0, 1]")
    order: Literal["original", "reference"] = Option("original", "patch order, or dominant tokens first")
    merge: Literal["weighted", "authors"] = Option("weighted", "size-weighted average, or target + mean")

    def decide(self, inp: VisualInput) -> Reduction:
        contextual = torch.floor(inp.keep.double() * self.contextual + 0.5).long()
        dominant = top_keep(inp.cls_attention, dataclasses.replace(inp, keep=inp.keep - contextual))
        rest = inp.visual & ~dominant
        step = (rest.sum(1) // contextual.clamp_min(1)).clamp_min(1)[:, None]
        index = rest.cumsum(1) - 1  # position among the rest
        target = rest & (index % step == 0) & (index // step < contextual[:, None])
        keys = F.normalize(inp.keys.float(), dim=-1)
        similarity = (keys @ keys.transpose(1, 2)).masked_fill(~target[:, None, :], -torch.inf)
        into = torch.where(target.any(1, keepdim=True), similarity.argmax(-1), -1)
        red = merge_into(dominant | target, into, inp)
        if self.merge == "authors":  # (n x target + sum) / 2n, doubled: target + mean of its n tokens
            merged = (rest & ~target).float()
            n = torch.zeros_like(merged).scatter_add_(1, into.clamp_min(0), merged)
            red = dataclasses.replace(
                red, feature_weight=torch.where(target, n.clamp_min(1), 1.0), gain=1.0 + (target & (n > 0))
            )
        if self.order == "original":
            return red
        layout = torch.arange(rest.shape[1], device=rest.device) + rest.shape[1] * rest
        return dataclasses.replace(red, order=layout)
