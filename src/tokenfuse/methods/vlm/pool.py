"""Baseline: average pooling of each image's patch grid to the operator's count (72 -> 8 x 9 cells,
36 -> 6 x 6), as LLaVA-OneVision and LLaVA-Video pool visual tokens.

Each patch goes whole to the cell holding its centre, so where the grid does not divide evenly (12 rows
into 8) cells hold one or two rows: a partition, not the overlapping windows of `adaptive_avg_pool2d`.
The merged token is the plain mean of its patches, in raster order of the cells.

Why the defaults: keep 0.25 (144 of LLaVA-1.5's 576 tokens), the operators' shared default, so a
baseline runs at the budget of the operators it is compared with.
"""

from __future__ import annotations

import torch

from ...core import Reduction
from ..registry import register
from .base import VisualInput, VisualMethod, fraction_grid


@register
class PoolVisual(VisualMethod):
    name = "pool"
    paper = "baseline: average pooling of the patch grid to the same count (LLaVA-OneVision 2D pooling)"
    placement = "boundary"

    def decide(self, inp: VisualInput) -> Reduction:
        if inp.grid is None:
            raise ValueError(
                "pool needs the whole patch grid: put it first, with no other reduction before it"
            )
        h, w = inp.grid
        B, N = inp.visual.shape
        if h * w != N or not bool((inp.keep == inp.keep[0]).all()):
            raise ValueError(f"pool expects {h}x{w} patches per image with one count for all, got {N}")
        ch, cw = fraction_grid(int(inp.keep[0]))
        device = inp.x.device
        rows = (torch.arange(h, device=device) * 2 + 1) * ch // (2 * h)  # cell row of each patch centre
        cols = (torch.arange(w, device=device) * 2 + 1) * cw // (2 * w)
        cell = (rows[:, None] * cw + cols[None, :]).flatten()  # (N,)
        first = torch.full((ch * cw,), N, device=device).scatter_reduce(
            0, cell, torch.arange(N, device=device), "amin"
        )
        return Reduction.hard(first[cell].expand(B, N))
