"""Images with content at several scales, for dense outputs: Fashion-MNIST items composed on a
larger black canvas, each canvas holding one item at every scale, at seeded positions.

A Fashion-MNIST image alone fills its frame with one object at one scale, so a saliency map of it
says little about what token reduction does to small objects or to several objects at once: merging
favours large uniform regions, and a small item is where a reduced model loses detail first. No
installed package ships a set of natural images (scikit-learn and matplotlib hold three between
them), so the canvases are made from the Fashion-MNIST data tokenfuse already reads.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CANVAS = 448  # side in pixels: a bench resizes it to its own image size, so every size sees the same content
SCALES = (0.125, 0.25, 0.5)  # each item's side as a share of the canvas side, one item per scale


def compose(
    items: np.ndarray, count: int, side: int = CANVAS, scales: tuple[float, ...] = SCALES, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`count` canvases (count, side, side) uint8 from `items` (M, h, w) uint8 on black, and where
    each item went: (count, len(scales), 4) rows of (item index, top, left, item side).

    Each canvas takes one item for every scale, drawn at random (seeded) from `items`, resized
    (bilinear, antialiased) to round(scale * side) pixels and placed at a random position inside the
    canvas; where items overlap, the brighter pixel is kept (the items are bright on black)."""
    if count < 1 or not len(items):
        raise ValueError(f"compose needs at least one canvas and one item, got {count} and {len(items)}")
    sizes = [max(1, min(side, round(s * side))) for s in scales]
    rng = np.random.default_rng(seed)
    canvases = np.zeros((count, side, side), np.uint8)
    placed = np.zeros((count, len(sizes), 4), np.int64)
    for i in range(count):
        for j, size in enumerate(sizes):
            item = int(rng.integers(len(items)))
            top, left = (int(v) for v in rng.integers(0, side - size + 1, size=2))
            patch = resize(items[item], size)
            view = canvases[i, top : top + size, left : left + size]
            np.maximum(view, patch, out=view)
            placed[i, j] = item, top, left, size
    return canvases, placed


def resize(item: np.ndarray, size: int) -> np.ndarray:
    """(h, w) uint8 -> (size, size) uint8: bilinear with antialiasing, rounded."""
    x = torch.from_numpy(item.astype(np.float32))[None, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()
