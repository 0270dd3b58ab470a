"""Baseline: a smaller image, so that the tower itself yields the operator's count of patches (72 ->
8 x 9 patches of 14 px: 112 x 126 px), the pixel values resized with antialiased bilinear
interpolation. Cheapest of all (the tower also runs on fewer tokens), at the cost of detail.

Why the defaults: keep 0.25 (144 of LLaVA-1.5's 576 tokens), the operators' shared default, so a
baseline runs at the budget of the operators it is compared with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core import Reduction
from ..registry import register
from .base import VisualInput, VisualMethod, fraction_grid


@register
class ResizeVisual(VisualMethod):
    name = "resize"
    paper = "baseline: a smaller input image with the same number of patches"
    placement = "boundary"

    def pixels(self, pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
        h, w = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        count = int(torch.ceil(torch.tensor(h * w * self.keep - 1e-9)).clamp_min(1))
        ch, cw = fraction_grid(count)
        if (ch, cw) == (h, w):
            return pixel_values
        return F.interpolate(pixel_values, size=(ch * patch, cw * patch), mode="bilinear", antialias=True)

    def decide(self, inp: VisualInput) -> Reduction:
        own = torch.arange(inp.x.shape[1], device=inp.x.device).expand(inp.x.shape[:2])
        return Reduction.hard(own)  # the tower already gave the count
