"""The Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): their own tower and boundary stages. The
in-LLM and decoding stages are the shared ones; Qwen3-VL's deepstack has its own hooks (`deepstack`).

What differs from LLaVA, and the choices made:
- The tower packs every image's patches into one sequence (attention within each image) and ends in
  its merger, which joins each 2 x 2 group of neighbouring patches into one LLM token. The boundary
  operator reduces the merger's output tokens, in the host's raster order; an image's grid is its
  grid_thw / merge size. Images of different sizes are reduced in groups of one grid each (pool needs
  one grid per call), and an image keeps ceil(keep x its tokens): a function of its grid and the
  budget alone, whatever else is in the batch.
- Multimodal RoPE, gathered: each kept token keeps the 3-D position id (t, h, w) it has in the
  unreduced prompt, and the text after an image keeps its own, as FastV's code keeps the kept tokens'
  position ids and as the in-LLM stage does for every family. Why: a kept token stays where it is in
  its image's grid, which is what M-RoPE encodes (recomputed ids would lay the kept tokens out as a
  smaller grid the model never saw); the reduced prefill computes what the unreduced model computes
  with the dropped tokens masked out of attention; and decoding continues at the host's positions:
  generate() grows the unreduced prompt's position ids, used as they are (no shift), and the host's
  `rope_deltas` (its offset for a step given no position ids) becomes the reduced prompt's: next
  position minus the prompt's real length. A merged token (pool, aim) takes its first patch's ids.
- No [CLS]: operators scoring by [CLS] attention are refused with the reason; `projected` is the
  merger's output itself (already the LLM's input space).
- Refused with the reason: a token method in the tower (vision=), the resize baseline, videos.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ...core import Tokens, reduce
from ...methods import Method, VisualInput, VisualMethod
from .boundary import questions, shorten
from .state import Pass, carried, carry, image_index
from .tower import CLS_SCORED, SCORED

if TYPE_CHECKING:
    from . import VlmPatch

TOWER_METHOD = (
    "a token method cannot run inside a Qwen-VL vision tower: its merger joins each 2 x 2 group of "
    "neighbouring patches into one LLM token and the prompt holds one placeholder per group, so the tower "
    "must keep every patch{window}. Reduce the merger's output instead, with a boundary operator "
    "(method='divprune', 'pool', ...), or inside the LLM (method='fastv')"
)
WINDOWS = (
    "; Qwen2.5-VL's windowed attention also reorders the patches into fixed windows of the full grid, "
    "which a merged or dropped patch would break"
)


@dataclass(eq=False)
class Grids:
    """What a tower run leaves on its output (`state.carry`): thw (images, 3) each image's patch grid
    (t, h, w) before the merger; layer_tokens (tower layers, images) patches entering each layer."""

    thw: Tensor
    layer_tokens: Tensor


class QwenTower:
    """The tower stage: refusals, and each run's grids, read at the tower's call (generate() encodes
    the images before the prefill and drops image_grid_thw from what the prefill gets)."""

    def __init__(self, patch: VlmPatch, boundary: VisualMethod | None, method: Method | None):
        self.patch = patch
        self.module = patch.inner.get_submodule(patch.family.tower)
        self.vision = None
        if method is not None:
            windowed = hasattr(self.module, "fullatt_block_indexes")
            raise ValueError(TOWER_METHOD.format(window=WINDOWS if windowed else ""))
        if boundary is not None:
            refuse(boundary, patch.family.name)

    def install(self, needs: frozenset[str]) -> None:
        self.patch.before(self.module, self._begin, kwargs=True)
        self.patch.after(self.module, self._end)

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.patch.slots.tower = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]

    def _end(self, module: nn.Module, args: tuple, out) -> None:
        thw = getattr(self.patch.slots, "tower", None)
        if thw is not None:
            self.patch.slots.tower = None
            patches = thw.prod(-1)
            carry(out, Grids(thw=thw, layer_tokens=patches.expand(len(module.blocks), -1)))

    def remove(self) -> None:
        pass


def refuse(boundary: VisualMethod, family: str) -> None:
    """Boundary operators a Qwen-VL tower cannot serve, refused before any work."""
    if boundary.needs & CLS_SCORED and not boundary.cls_substitute:
        raise ValueError(
            f"{boundary.name} scores each visual token by the [CLS] token's attention, and a {family} tower "
            "has no [CLS] token (nor any pooled query): there is nothing for it to read. Choose an operator "
            "that does not read [CLS] attention (divprune, cdpruner, pool, random, aim, or fastv in the LLM)"
        )
    if boundary.needs & SCORED:
        raise ValueError(
            f"{boundary.name} reads the tower's keys, which a {family} tower does not expose: choose an "
            "operator that does not read them (divprune, cdpruner, pool, random, aim, or fastv in the LLM)"
        )
    if type(boundary).pixels is not VisualMethod.pixels:
        raise ValueError(
            f"{boundary.name} changes the pixels, which a {family} processor has already cut into merged "
            "patches: give the processor a smaller image instead (its max_pixels), or use pool"
        )


class QwenBoundary:
    """The boundary stage: the operator on each image's merger output tokens, then the prompt rebuilt
    around the kept ones with their gathered 3-D position ids."""

    def __init__(self, patch: VlmPatch, method: VisualMethod | None):
        self.patch = patch
        self.method = method
        self.merge = patch.config.vision_config.spatial_merge_size

    def count(self, fwd: Pass, kwargs: dict, ids: Tensor) -> None:
        """Leave on `fwd` the images of an unreduced prompt and the placeholders each holds."""
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:
            counts = torch.tensor([len(f) for f in encoded.pooler_output], device=ids.device)
        else:
            counts = kwargs["image_grid_thw"].prod(-1).to(ids.device) // self.merge**2
        counted(fwd, counts)

    def rebuild(self, fwd: Pass, module: nn.Module, kwargs: dict, valid: Tensor):
        """As `boundary.Boundary.rebuild`: (the host's new kwargs, real tokens (B, L'), position shift
        (B, 1): none, kept tokens keep their ids; new input_ids)."""
        patch = self.patch
        mm = kwargs.get("mm_encoder_outputs") or {}
        if kwargs.get("pixel_values_videos") is not None or mm.get("video") is not None:
            raise ValueError(
                "tokenfuse reduces images, not videos, on a Qwen-VL model: run videos on the unreduced model "
                "(tokenfuse.remove(model)), or give their frames as images"
            )
        ids = kwargs["input_ids"]
        encoded = mm.get("image")
        if encoded is None:
            encoded = patch.host(
                module.get_image_features, kwargs["pixel_values"], kwargs["image_grid_thw"], return_dict=True
            )
        grids = carried(encoded, Grids)
        if grids is None:
            raise RuntimeError("these image features were encoded before tokenfuse.apply: encode them again")
        is_image = ids == patch.image_token
        counts = torch.tensor([len(f) for f in encoded.pooler_output], device=ids.device)
        if int(is_image.sum()) != int(counts.sum()):
            raise ValueError(
                f"{int(is_image.sum())} image tokens for {len(counts)} images holding {counts.tolist()} "
                "tokens: give each image its placeholders as the processor writes them"
            )
        asked = questions(module, ids, valid, is_image, counts) if "question" in self.method.needs else {}
        deep = getattr(encoded, "deepstack_features", None) or []
        kept, origins, tokens = self._reduce(encoded.pooler_output, deep, grids.thw, asked)
        chosen = torch.zeros(len(counts), int(counts.max()), dtype=torch.bool, device=ids.device)
        for i, o in enumerate(origins):
            chosen[i, o] = True
        keep = valid & (~is_image | chosen[image_index(is_image, counts)])
        pad = patch.config.text_config.pad_token_id
        short, new_valid, order = shorten(kwargs, keep, valid, pad)
        reduced = copy.copy(encoded)
        reduced.pooler_output = tuple(kept[0])
        if deep:
            reduced.deepstack_features = [tuple(level) for level in kept[1:]]
        out = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "image_grid_thw")}
        out |= short | {"mm_encoder_outputs": {**mm, "image": reduced}}
        out["position_ids"] = positions(module, kwargs, grids.thw, order, new_valid, is_image)
        if kwargs.get("mm_token_type_ids") is not None:
            out["mm_token_type_ids"] = kwargs["mm_token_type_ids"].gather(1, order) * new_valid
        fwd.boundary, fwd.tower_trace = tokens, grids.layer_tokens
        counted(fwd, counts)
        return out, new_valid, torch.zeros_like(counts[:1]).expand(len(ids), 1), short["input_ids"]

    def _reduce(self, features, deep, thw, asked) -> tuple[list[list[Tensor]], list[Tensor], Tokens]:
        """The operator on the images, in groups of one grid: per level (the merger's output, then each
        deepstack level) each image's kept tokens; each image's kept indices (sorted); and the kept
        tokens of all images as one padded `Tokens` (their origins, in the order of the prompt)."""
        n = len(features)
        grids = [(int(t), int(h) // self.merge, int(w) // self.merge) for t, h, w in thw.tolist()]
        levels = [features, *deep]
        kept: list[list] = [[None] * n for _ in levels]
        origins: list = [None] * n
        sizes: list = [None] * n
        for grid in dict.fromkeys(grids):
            group = [i for i, g in enumerate(grids) if g == grid]
            x = torch.stack([features[i] for i in group])
            B, N, _ = x.shape
            real = torch.ones(B, N, dtype=torch.bool, device=x.device)
            start = Tokens.start(real, ~real, track_origin=True)
            inp = VisualInput(
                x=x,
                tokens=start,
                visual=real,
                keep=self.method.counts(torch.full((B,), N, device=x.device)),
                grid=grid[1:] if grid[0] == 1 else None,
                projected=x if "projected" in self.method.needs else None,
                **{k: v[group] for k, v in asked.items()},
            )
            red = self.patch.timed(self.method.decide, inp)
            out = [reduce(torch.stack([level[i] for i in group]), start, red) for level in levels]
            tokens = out[0][1]
            for j, i in enumerate(group):
                mask = tokens.mask[j]
                order = tokens.origin[j][mask].argsort()
                origins[i], sizes[i] = tokens.origin[j][mask][order], tokens.size[j][mask][order]
                for level, (y, _) in zip(kept, out, strict=True):
                    level[i] = y[j][mask][order]
        return kept, origins, padded(origins, sizes)


def counted(fwd: Pass, counts: Tensor) -> None:
    """The images of the prompt and their placeholders (`counts`), left on `fwd`."""
    fwd.images, fwd.lengths, fwd.per_image = len(counts), counts, int(counts.max()) if len(counts) else 0


def padded(origins: list[Tensor], sizes: list[Tensor]) -> Tokens:
    """The kept tokens of each image as one padded batch (images, most kept): their sizes and origins."""
    width = max(len(o) for o in origins)
    size = torch.zeros(len(origins), width, dtype=sizes[0].dtype, device=sizes[0].device)
    origin = torch.zeros(len(origins), width, dtype=torch.long, device=size.device)
    for i, (o, s) in enumerate(zip(origins, sizes, strict=True)):
        size[i, : len(o)], origin[i, : len(o)] = s, o
    return Tokens(size=size, protected=torch.zeros_like(size, dtype=torch.bool), origin=origin)


def positions(module: nn.Module, kwargs: dict, thw: Tensor, order: Tensor, valid: Tensor, is_image: Tensor):
    """The reduced prompt's position ids: the unreduced prompt's (the caller's, or the host's own
    `get_rope_index` on the caller's prompt) gathered at the kept positions `order` (B, L'); the text
    row of generate()'s (4, B, L) ids stays contiguous (the host reads packed sequences from it). Sets
    the host's `rope_deltas` to the reduced prompt's."""
    given = kwargs.get("position_ids")
    if given is None:
        ids = kwargs["input_ids"]
        types = kwargs.get("mm_token_type_ids")
        given, _ = module.get_rope_index(
            ids,
            mm_token_type_ids=is_image.int() if types is None else types,
            image_grid_thw=thw,
            attention_mask=kwargs.get("attention_mask"),
        )
    out = given.gather(-1, order.expand(*given.shape[:-2], *order.shape))
    if out.dim() == 3 and out.shape[0] == 4:
        out[0] = (valid.cumsum(1) - 1).masked_fill(~valid, 0)
    spatial = out[-3:] if out.dim() == 3 else out[None]
    last = spatial.masked_fill(~valid, torch.iinfo(out.dtype).min).amax((0, 2))
    module.rope_deltas = (last + 1 - valid.sum(1))[:, None]
    return out
