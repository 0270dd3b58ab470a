"""Drawing what an image kept: the SVG renders the image and marks exactly the kept cells of its grid
(end to end from a Qwen-VL image's tokenfuse.kept), and bad indices are refused."""

from __future__ import annotations

import base64
import io
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image
from test_qwen_vl import batch_of, prompts, tiny_qwen

import tokenfuse
from tokenfuse.eval.overlay import kept_svg

SVG = "{http://www.w3.org/2000/svg}"


def cells(svg: str, kind: str) -> list[tuple[float, float, float, float]]:
    rects = ET.fromstring(svg).iter(f"{SVG}rect")
    return [
        tuple(float(r.get(k)) for k in ("x", "y", "width", "height")) for r in rects if r.get("class") == kind
    ]


def test_the_overlay_renders_the_image_and_marks_the_kept_cells():
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    svg = kept_svg(image, (2, 3), [0, 5], title="pool <0.25>")
    root = ET.fromstring(svg)
    assert (root.get("width"), root.get("height")) == ("60", "40")
    href = root.find(f"{SVG}image").get("href")
    png = Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1])))
    assert np.array_equal(np.asarray(png), image)
    assert cells(svg, "kept") == [(0, 0, 20, 20), (40, 20, 20, 20)]  # cell 0: top left; 5: bottom right
    assert len(cells(svg, "dropped")) == 4


def test_an_image_kept_by_a_qwen_model_is_drawn_on_its_merged_grid():
    model = tiny_qwen("qwen2-vl")
    rows = prompts()[1:2]  # one image of 8 x 12 patches: a 4 x 6 grid of merged tokens
    tokenfuse.apply(model, "divprune", keep=0.25)
    with torch.no_grad():
        model(**batch_of(rows))
    (kept,) = tokenfuse.kept(model)
    svg = kept_svg(np.zeros((32, 48, 3), dtype=np.uint8), (4, 6), kept.tolist())
    expected = sorted((8.0 * (int(i) % 6), 8.0 * (int(i) // 6), 8.0, 8.0) for i in kept)
    assert sorted(cells(svg, "kept")) == expected and len(expected) == 6


def test_indices_outside_the_grid_are_refused():
    with pytest.raises(ValueError, match=r"kept indices must lie in the 2 x 2 grid"):
        kept_svg(np.zeros((4, 4, 3), dtype=np.uint8), (2, 2), [4])
