"""What an image kept, drawn over it: the visual-token grid on the image, each kept token's cell
outlined and every other cell dimmed, as an SVG (the image inside it as a PNG). The kept indices are
what `tokenfuse.kept(model)` returns for the image, in raster order over its grid (a Qwen-VL image's
grid is its grid_thw / merge size)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from html import escape

import numpy as np


def kept_svg(image: np.ndarray, grid: tuple[int, int], kept: Sequence[int], title: str = "") -> str:
    """image: (H, W, 3) uint8 RGB (or floats in [0, 1]); grid: (rows, columns) of its visual tokens;
    kept: indices of the kept tokens, row-major. Returns the SVG text, sized as the image."""
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("drawing what an image kept needs Pillow: pip install 'tokenfuse[report]'") from None
    rows, cols = grid
    kept = {int(i) for i in kept}
    if any(not 0 <= i < rows * cols for i in kept):
        raise ValueError(f"kept indices must lie in the {rows} x {cols} grid (0 .. {rows * cols - 1})")
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        pixels = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
    height, width = pixels.shape[:2]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    ch, cw = height / rows, width / cols
    cells = []
    for i in range(rows * cols):
        x, y = (i % cols) * cw, (i // cols) * ch
        style = (
            'fill="none" stroke="#ffd400" stroke-width="1"' if i in kept else 'fill="#000" fill-opacity="0.6"'
        )
        kind = "kept" if i in kept else "dropped"
        cells.append(
            f'<rect class="{kind}" data-index="{i}" x="{x:g}" y="{y:g}" '
            f'width="{cw:g}" height="{ch:g}" {style}/>'
        )
    label = f"<title>{escape(title)}</title>" if title else ""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">{label}'
        f'<image width="{width}" height="{height}" href="data:image/png;base64,{data}"/>'
        + "".join(cells)
        + "</svg>"
    )
