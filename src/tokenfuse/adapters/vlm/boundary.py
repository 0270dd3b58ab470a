"""The tower-to-LLM stage: the boundary operator on each image's selected features, then the prompt
rebuilt around the kept ones.

At the inner model's pre-hook the host's own encoding seam runs (tower, layer selection, projector),
with the operator applied to the projector's input; the sequence is then rebuilt with one placeholder
per kept token (padding on the caller's side), with its attention mask and position ids, and the host
is handed the projected features of the kept tokens to fill the placeholders as it fills them.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ...core import Tokens, reduce
from ...methods import VisualInput, VisualMethod
from ..engine import ahead, left_padded
from .state import Pass, carried, question, rows
from .tower import TowerRun

if TYPE_CHECKING:
    from . import VlmPatch


class Boundary:
    """The boundary stage of `patch`, with its operator `method` (None: the images are only encoded,
    the tower reducing them)."""

    def __init__(self, patch: VlmPatch, method: VisualMethod | None):
        self.patch = patch
        self.method = method

    def rebuild(self, fwd: Pass, module: nn.Module, kwargs: dict, valid: Tensor):
        """Reduce the images' selected features, project the kept ones, and rebuild the sequence
        around them: (the host's new kwargs, real tokens (B, L'), real tokens removed per row (B, 1),
        new input_ids). The host then embeds and fills the placeholders itself."""
        patch, family = self.patch, self.patch.family
        ids = kwargs["input_ids"]
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:
            encoded = getattr(module, family.encode)(
                pixel_values=kwargs["pixel_values"],
                **family.encode_kwargs(patch.config),
                image_sizes=kwargs.get("image_sizes"),
                return_dict=True,
            )
        run = carried(encoded, TowerRun)
        if run is None or run.selected is None:
            raise RuntimeError("these image features were encoded before tokenfuse.apply: encode them again")
        is_image = ids == patch.image_token
        n_images = run.selected.shape[0]
        per_image, extra = divmod(int(is_image.sum()), max(n_images, 1))
        if extra:
            raise ValueError(
                f"{int(is_image.sum())} image tokens for {n_images} images: each needs the same number"
            )
        x, tokens = self._reduce(run, module, ids, valid, is_image, per_image)
        fwd.boundary, fwd.tower_trace = tokens, run.layer_tokens
        fwd.images, fwd.per_image = n_images, per_image
        features = module.get_submodule(family.projector)(x)
        kept = tokens.count
        flat = is_image.flatten().cumsum(0).view_as(is_image) - 1
        image_of = (flat // per_image).clamp(0, n_images - 1)
        keep = valid & (~is_image | (flat % per_image < kept[image_of]))
        left = left_padded(valid)
        length = int(keep.sum(1).max())
        order = ahead(~keep)[:, -length:] if left else ahead(keep)[:, :length]
        new_valid = keep.gather(1, order)
        pad = patch.config.text_config.pad_token_id
        new_ids = torch.where(new_valid, ids.gather(1, order), 0 if pad is None else pad)
        reduced = copy.copy(encoded)
        reduced.pooler_output = [f[m] for f, m in zip(features, tokens.mask, strict=True)]
        out = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "image_sizes")}
        out |= {
            "input_ids": new_ids,
            "mm_encoder_outputs": {**(kwargs.get("mm_encoder_outputs") or {}), "image": reduced},
        }
        mask = kwargs.get("attention_mask")
        if mask is not None or not bool(new_valid.all()):
            out["attention_mask"] = new_valid.to(torch.long if mask is None else mask.dtype)
        if kwargs.get("position_ids") is not None:
            out["position_ids"] = (new_valid.long().cumsum(1) - 1).masked_fill(~new_valid, 0)
        shift = (valid.sum(1) - new_valid.sum(1))[:, None]
        return out, new_valid, shift, new_ids

    def _reduce(self, run: TowerRun, module, ids, valid, is_image, per_image) -> tuple[Tensor, Tokens]:
        """(B_img, N', C) the selected features after the boundary operator, and their tokens (with
        each kept token's index in the tower output, unless the tower merged them)."""
        x = run.selected
        B, N, _ = x.shape
        none = torch.zeros(B, N, dtype=torch.bool, device=x.device)
        tokens = Tokens.start(~none, none, track_origin=True)
        grid = run.grid if run.grid[0] * run.grid[1] == N else None
        if run.tokens is not None:  # the tower reduced: its sizes, the [CLS] dropped if the strategy drops it
            drop = run.tokens.size.shape[1] - N
            tokens = Tokens(size=run.tokens.size[:, drop:], protected=none)
            grid = None
        method = self.method
        if method is None or method.keep >= 1.0:
            return x, tokens
        keep = torch.minimum(method.counts(torch.full((B,), run.full, device=x.device)), tokens.count)
        needs = self._needs(run, module, x, ids, valid, is_image, per_image)
        inp = VisualInput(x=x, tokens=tokens, visual=tokens.mask, keep=keep, grid=grid, **needs)
        return reduce(x, tokens, self.patch.timed(method.decide, inp))

    def _needs(self, run: TowerRun, module, x, ids, valid, is_image, per_image) -> dict[str, Tensor]:
        """What the operator scores with, computed only when it names it (see VisualInput)."""
        needs = self.method.needs
        out: dict[str, Tensor] = {}
        tower = self.patch.tower
        drop = self.patch.family.dropped(self.patch.config)
        if needs & {"cls_attention", "cls_attention_layers"}:
            layers = (
                range(tower.feature_layer + 1) if "cls_attention_layers" in needs else [tower.feature_layer]
            )
            maps = torch.stack([cls_attention(run.qk[i])[:, drop:] for i in layers], 1)
            if "cls_attention_layers" in needs:
                out["cls_attention_layers"] = maps
            if "cls_attention" in needs:
                out["cls_attention"] = maps[:, -1]
        if "keys" in needs:
            out["keys"] = run.qk[tower.feature_layer]["k"].mean(1)[:, drop:]
        if "projected" in needs:
            out["projected"] = module.get_submodule(self.patch.family.projector)(x)
        if "question" in needs:
            asked = question(is_image & valid, valid)
            image_rows = is_image.nonzero()[:, 0][::per_image]  # the row of each image, in image order
            index, qmask = rows(asked)
            embeds = module.get_input_embeddings()(ids.gather(1, index))
            out |= {"question": embeds[image_rows], "question_mask": qmask[image_rows]}
        return out


def cls_attention(qk: dict[str, Tensor]) -> Tensor:
    """(B, N) the [CLS] query's attention over a tower layer's tokens, mean over heads."""
    q, k = qk["q"], qk["k"]
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)[:, :, 0].mean(1)
