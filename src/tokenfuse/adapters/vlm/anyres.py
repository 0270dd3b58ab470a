"""AnyRes images (LLaVA-NeXT, LLaVA-OneVision): each image is a base view plus a grid of crops, which
the host lays out as the base view's tokens, then the crops' combined patch grid, unpadded by the
image's size (`image_sizes`) and, for OneVision, bilinearly downsampled when it exceeds
`vision_aspect_ratio` (anyres_max_9), each of its rows ended by the learned `image_newline` token.
An image without crops (OneVision's multi-image prompts) is its base view and one newline.

How tokenfuse reduces such an image (the choices, also stated in README):
- The boundary operator sees each image as one sequence, its content tokens in the host's order (base
  view, then the unpadded crop grid row by row), gathered from the tower's views before the
  projector, so the budget holds for the whole image: ceil(keep x (base + unpadded crop tokens)).
- Every newline token is kept, on top of that budget (as CDPruner does; VisionZip drops them):
  a newline is not image content but the layout marker the LLM was trained with. After the
  boundary an image is its kept content tokens in the host's order, each row's newline after the
  row's kept tokens (a row that kept none is its newline alone). In the LLM, newlines are protected
  like text: in-LLM operators count and drop content tokens only.
- Operators needing the whole patch grid (pool, resize) are refused: an AnyRes image is several grids
  of different shapes. So is a token method in the tower: the host packs each view by its full patch
  grid. OneVision's video input is refused while anything is reduced (its frames are pooled by the
  host, and are not images).
- Deviation: OneVision downsamples a large image's crop grid after the projector; the boundary
  operator works before it, so tokenfuse downsamples the tower features instead (the same bilinear
  interpolation, before rather than after the projector's MLP). Nothing changes at keep 1.0, where the
  host's own path runs.
- `tokenfuse.kept(model)` counts an image's kept content tokens in its placeholder sequence (the host's
  packed order, newlines included in the numbering).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core import Tokens

#: arguments of the host's encoding seam that fix the images' layout
INPUTS = ("image_sizes", "batch_num_images", "vision_aspect_ratio")
GRID_OPERATORS = {
    "pool": "averages one patch grid per image into cells",
    "resize": "shrinks the pixels, while the host packs each view by its fixed patch grid",
}


@dataclass(eq=False)
class Image:
    """One image's layout: views (base + crops) in the tower, base tokens (the base view's), tiles
    (rows, columns of crops), crops (H, W) the index of each unpadded token in the crops' combined
    grid (None: the base view alone), size (rows, columns) of that grid after downsampling."""

    views: int
    base: int
    tiles: tuple[int, int] = (0, 0)
    crops: Tensor | None = None
    size: tuple[int, int] = (0, 0)

    @property
    def content(self) -> int:
        return self.base + self.size[0] * self.size[1]

    def content_slots(self) -> Tensor:
        """(content,) each content token's place in the image's placeholders."""
        rows, cols = self.size
        grid = torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)[None]
        return torch.cat([torch.arange(self.base), self.base + grid.flatten()])

    def newline_slots(self) -> Tensor:
        """(rows,) each newline's place in the image's placeholders (one after the base view when
        there are no crops)."""
        if self.crops is None:
            return torch.tensor([self.base])
        rows, cols = self.size
        return self.base + torch.arange(rows) * (cols + 1) + cols

    def content_views(self) -> Tensor:
        """(content,) the view each content token comes from: 0 the base view, 1 + r x columns + c the
        crop at tile row r, column c; a downsampled grid's token, the crop of its nearest source token."""
        base = torch.zeros(self.base, dtype=torch.long)
        if self.crops is None:
            return base
        (H, W), (h, w), side = self.crops.shape, self.size, math.isqrt(self.base)
        rows, cols = (2 * torch.arange(h) + 1) * H // (2 * h), (2 * torch.arange(w) + 1) * W // (2 * w)
        source = self.crops[rows][:, cols]
        width = self.tiles[1] * side
        crop = (source // width // side) * self.tiles[1] + source % width // side
        return torch.cat([base, 1 + crop.flatten()])

    @property
    def placeholders(self) -> int:
        return self.content + len(self.newline_slots())


class AnyRes:
    """The AnyRes layout of a family; `downsample`: OneVision's anyres_max downsampling."""

    inputs = INPUTS

    def __init__(self, downsample: bool = False):
        self.downsample = downsample

    def images(self, inner: nn.Module, inputs: dict) -> list[Image]:
        """Each image's layout, from the encoding call's `image_sizes` (and OneVision's
        batch_num_images, vision_aspect_ratio), with the host's own functions."""
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError("an AnyRes model needs image_sizes with pixel_values (its processor gives them)")
        host, config = sys.modules[type(inner).__module__], inner.config
        tile = config.vision_config.image_size
        side = tile // config.vision_config.patch_size
        counts = inputs.get("batch_num_images")
        crop = [True] * len(sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
        out = []
        for size, cropped in zip(sizes, crop, strict=True):
            if not cropped:
                out.append(Image(views=1, base=side * side))
                continue
            views = host.image_size_to_num_patches(size, config.image_grid_pinpoints, tile)
            nph, npw = host.get_anyres_image_grid_shape(size, config.image_grid_pinpoints, tile)
            index = torch.arange(nph * side * npw * side).view(1, nph * side, npw * side)
            crops = host.unpad_image(index, size)[0]
            limit = inputs.get("vision_aspect_ratio") or getattr(config, "vision_aspect_ratio", None)
            shape = self._size(tuple(crops.shape), side, limit)
            out.append(Image(views, side * side, (nph, npw), crops, shape))
        return out

    def _size(self, shape: tuple[int, int], side: int, limit: str | None) -> tuple[int, int]:
        """OneVision's downsampled grid (the host's arithmetic), or the unpadded one."""
        if not self.downsample or limit is None:
            return shape
        ratio = math.sqrt(shape[0] * shape[1] / (int(limit.removeprefix("anyres_max_")) * side**2))
        return (int(shape[0] // ratio), int(shape[1] // ratio)) if ratio > 1.1 else shape

    @staticmethod
    def check(boundary, tower_method) -> None:
        """Refuse, at install, what an AnyRes image cannot take (see the module docstring)."""
        if boundary is not None and boundary.name in GRID_OPERATORS:
            raise ValueError(
                f"{boundary.name} {GRID_OPERATORS[boundary.name]}, and an AnyRes image (LLaVA-NeXT, "
                "LLaVA-OneVision) is a base view plus unpadded crops, grids of different shapes: use "
                "random, divprune or cdpruner at the boundary, or an in-LLM operator (fastv, sparsevlm)"
            )
        if tower_method is not None:
            raise ValueError(
                "a token method in the vision tower merges each view's patches, and an AnyRes model "
                "(LLaVA-NeXT, LLaVA-OneVision) packs every view by its full patch grid (unpadding, a "
                "newline per row): reduce at the boundary or in the LLM instead (method=..., no vision=)"
            )

    @staticmethod
    def refuse_video(kwargs: dict) -> None:
        if kwargs.get("pixel_values_videos") is not None or (kwargs.get("mm_encoder_outputs") or {}).get(
            "video"
        ):
            raise ValueError(
                "tokenfuse reduces LLaVA-OneVision's images, not its videos (pixel_values_videos, whose "
                "frames the host pools itself): run videos on the unreduced model (tokenfuse.remove), "
                "or give the frames as images"
            )


def arrange(images: list[Image], views: Tensor) -> list[Tensor]:
    """Per image, (content, C) its content tokens in the host's order, from per-view tokens
    (V, N, C): the base view, then the crops' grid unpadded (and downsampled) row by row."""
    out, at = [], 0
    side, C = math.isqrt(views.shape[1]), views.shape[-1]
    for image in images:
        part = views[at]
        if image.crops is not None:
            nph, npw = image.tiles
            grid = views[at + 1 : at + image.views].view(nph, npw, side, side, C)
            grid = grid.permute(0, 2, 1, 3, 4).reshape(-1, C)[image.crops.flatten().to(views.device)]
            if image.size != tuple(image.crops.shape):
                grid = grid.T.reshape(1, C, *image.crops.shape)
                grid = F.interpolate(grid, list(image.size), mode="bilinear")[0].flatten(1).T
            part = torch.cat([part, grid])
        out.append(part)
        at += image.views
    return out


def pad(parts: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(B, M, *) the parts padded with zeros after their ends, and (B, M) which positions are real."""
    x = torch.nn.utils.rnn.pad_sequence(parts, batch_first=True)
    length = torch.tensor([len(p) for p in parts], device=x.device)
    return x, torch.arange(x.shape[1], device=x.device)[None] < length[:, None]


def views(images: list[Image], device) -> Tensor:
    """(B_img, most content tokens) each content token's view (`Image.content_views`), -1 padding."""
    out, real = pad([image.content_views().to(device) for image in images])
    return out.masked_fill(~real, -1)


def assemble(
    images: list[Image], features: Tensor, tokens: Tokens, newline: Tensor
) -> tuple[list[Tensor], Tokens]:
    """Per image, its kept projected content tokens (B, M', C') and every newline, in placeholder
    order; and their tokens, each token's `origin` its place in the image's placeholders."""
    parts, places = [], []
    for i, image in enumerate(images):
        kept = tokens.mask[i]
        lines = image.newline_slots().to(features.device)
        place = torch.cat([image.content_slots().to(features.device)[tokens.origin[i][kept]], lines])
        order = place.argsort()
        line = newline.to(features)[None].expand(len(lines), -1)
        parts.append(torch.cat([features[i][kept], line])[order])
        places.append(place[order])
    origin, valid = pad(places)
    size = valid.to(torch.float32)
    return parts, Tokens(size=size, protected=torch.zeros_like(valid), origin=origin)


def newline_table(images: list[Image], device) -> tuple[Tensor, Tensor]:
    """(B_img,) placeholders per image, and (B_img, most placeholders) which of them are newlines."""
    lengths = torch.tensor([image.placeholders for image in images], device=device)
    table = torch.zeros(len(images), int(lengths.max()), dtype=torch.bool, device=device)
    for i, image in enumerate(images):
        table[i, image.newline_slots().to(device)] = True
    return lengths, table


NEXT = AnyRes()
ONEVISION = AnyRes(downsample=True)
