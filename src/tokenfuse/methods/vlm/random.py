"""Baseline: keep a random subset of each image's visual tokens, of the operator's count.

One seeded random ranking of the patch positions, the same for every image (so an image gets the same
subset alone or in any batch, in any thread): a random sparse sampling of the grid. A scoring operator
must beat this to earn its cost.

Why the defaults: keep 0.25 (144 of LLaVA-1.5's 576 tokens), the operators' shared default, so a
baseline runs at the budget of the operators it is compared with. Seed 0: any fixed seed.
"""

from __future__ import annotations

import torch

from ...core import Reduction
from ..options import Option
from ..registry import register
from .base import VisualInput, VisualMethod, prune_to, top_keep


@register
class RandomVisual(VisualMethod):
    name = "random"
    paper = "baseline: a random subset of the visual tokens, same count"
    placement = "boundary"
    prunes = True

    seed: int = Option(0, "the random ranking's seed")

    def decide(self, inp: VisualInput) -> Reduction:
        gen = torch.Generator(device=inp.x.device).manual_seed(self.seed)
        score = torch.rand(inp.visual.shape[1], generator=gen, device=inp.x.device).expand_as(inp.visual)
        return prune_to(top_keep(score, inp), inp)
