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
from . import anyres
from .state import Pass, carried, image_index, question, rows
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
            inputs = {"image_sizes": kwargs.get("image_sizes")}
            if family.views is not None:
                inputs |= {k: kwargs[k] for k in family.views.inputs if kwargs.get(k) is not None}
            encoded = patch.host(
                getattr(module, family.encode),
                pixel_values=kwargs["pixel_values"],
                **family.encode_kwargs(patch.config),
                **inputs,
                return_dict=True,
            )
        run = carried(encoded, TowerRun)
        if run is None or run.selected is None:
            raise RuntimeError("these image features were encoded before tokenfuse.apply: encode them again")
        is_image = ids == patch.image_token
        images, lengths = self.layout(fwd, run.inputs, run.selected.shape[0], is_image)
        x, tokens = self._reduce(run, images, module, ids, valid, is_image, lengths)
        features = patch.host(module.get_submodule(family.projector), x)
        if images is None:
            pooled = [f[m] for f, m in zip(features, tokens.mask, strict=True)]
        else:
            pooled, tokens = anyres.assemble(images, features, tokens, module.image_newline)
        fwd.boundary, fwd.tower_trace = tokens, run.layer_tokens
        image_of, index = image_index(is_image, lengths)
        keep = valid & (~is_image | (index < tokens.count[image_of]))
        short, new_valid, _ = shorten(kwargs, keep, valid, patch.config.text_config.pad_token_id)
        reduced = copy.copy(encoded)
        reduced.pooler_output = pooled
        out = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "image_sizes")}
        out |= short | {"mm_encoder_outputs": {**(kwargs.get("mm_encoder_outputs") or {}), "image": reduced}}
        if kwargs.get("position_ids") is not None:
            out["position_ids"] = (new_valid.long().cumsum(1) - 1).masked_fill(~new_valid, 0)
        shift = (valid.sum(1) - new_valid.sum(1))[:, None]
        return out, new_valid, shift, short["input_ids"]

    def layout(self, fwd: Pass, inputs: dict, n_images: int, is_image: Tensor) -> tuple[list | None, Tensor]:
        """The images' layout, left on `fwd` (images, per_image: the most placeholders of an image,
        lengths, newline): each image's AnyRes layout (None: one view each), and (B_img,) the
        placeholders each has in the prompt."""
        views, total = self.patch.family.views, int(is_image.sum())
        images = None if views is None else views.images(self.patch.inner, inputs)
        if images is None:
            per_image, extra = divmod(total, max(n_images, 1))
            if extra:
                raise ValueError(f"{total} image tokens for {n_images} images: each needs the same number")
            lengths = torch.full((n_images,), per_image, device=is_image.device)
        else:
            lengths, fwd.newline = anyres.newline_table(images, is_image.device)
            if int(lengths.sum()) != total:
                raise ValueError(
                    f"{total} image tokens for images whose layout (image_sizes) needs {int(lengths.sum())}: "
                    "give the prompt the processor made for these images"
                )
        fwd.images, fwd.lengths = len(lengths), lengths
        fwd.per_image = int(lengths.max()) if len(lengths) else 0
        return images, lengths

    def _reduce(self, run: TowerRun, images, module, ids, valid, is_image, lengths) -> tuple[Tensor, Tokens]:
        """(B_img, N', C) the selected features after the boundary operator, and their tokens (with
        each kept token's index in the tower output, or in its image's content sequence for AnyRes
        images, unless the tower merged them)."""
        x = run.selected
        B, N, _ = x.shape
        none = torch.zeros(B, N, dtype=torch.bool, device=x.device)
        tokens = Tokens.start(~none, none, track_origin=True)
        grid = run.grid if run.grid[0] * run.grid[1] == N else None
        full = torch.full((B,), run.full, device=x.device)
        if images is not None:  # one sequence per image: its views' content tokens, in the host's order
            x, real = anyres.pad(anyres.arrange(images, x))
            tokens = Tokens.start(real, torch.zeros_like(real), track_origin=True)
            full, grid = tokens.count, None
        if run.tokens is not None:  # the tower reduced: its sizes, the [CLS] dropped if the strategy drops it
            drop = run.tokens.size.shape[1] - N
            tokens = Tokens(size=run.tokens.size[:, drop:], protected=none)
            grid = None
        method = self.method
        if method is None or method.keep >= 1.0:
            return x, tokens
        keep = torch.minimum(method.counts(full), tokens.count)
        needs = self._needs(run, images, module, x, ids, valid, is_image, lengths)
        inp = VisualInput(x=x, tokens=tokens, visual=tokens.mask, keep=keep, grid=grid, **needs)
        return reduce(x, tokens, self.patch.timed(method.decide, inp))

    def _needs(self, run: TowerRun, images, module, x, ids, valid, is_image, lengths) -> dict[str, Tensor]:
        """What the operator scores with, computed only when it names it (see VisualInput); the
        tower's per-view tensors laid out as `x` is (AnyRes images: one sequence each)."""

        def laid(t: Tensor) -> Tensor:
            if images is None:
                return t
            flat = t.dim() == 2
            out = anyres.pad(anyres.arrange(images, t[..., None] if flat else t))[0]
            return out[..., 0] if flat else out

        needs = self.method.needs
        out: dict[str, Tensor] = {}
        tower = self.patch.tower
        drop = self.patch.family.dropped(self.patch.config)
        if needs & {"cls_attention", "cls_attention_layers"} and tower.has_cls:  # else: a substitute
            layers = (
                range(tower.feature_layer + 1) if "cls_attention_layers" in needs else [tower.feature_layer]
            )
            maps = torch.stack([laid(cls_attention(run.qk[i])[:, drop:]) for i in layers], 1)
            if "cls_attention_layers" in needs:
                out["cls_attention_layers"] = maps
            if "cls_attention" in needs:
                out["cls_attention"] = maps[:, -1]
        if "keys" in needs:
            out["keys"] = laid(run.qk[tower.feature_layer]["k"].mean(1)[:, drop:])
        if "projected" in needs:
            out["projected"] = module.get_submodule(self.patch.family.projector)(x)
        if "question" in needs:
            out |= questions(module, ids, valid, is_image, lengths)
        if "views" in needs and images is not None:
            out["views"] = anyres.views(images, x.device)
        return out


def cls_attention(qk: dict[str, Tensor]) -> Tensor:
    """(B, N) the [CLS] query's attention over a tower layer's tokens, mean over heads."""
    q, k = qk["q"], qk["k"]
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)[:, :, 0].mean(1)


def questions(module: nn.Module, ids: Tensor, valid: Tensor, is_image: Tensor, lengths: Tensor) -> dict:
    """Each image's question (the real text after its row's last image): its input embeddings
    (B_img, Q, C) and mask (B_img, Q), images filling their `lengths` placeholders in prompt order."""
    asked = question(is_image & valid, valid)
    starts = lengths.cumsum(0) - lengths
    image_rows = is_image.nonzero()[:, 0][starts]  # the row of each image, in image order
    index, qmask = rows(asked)
    embeds = module.get_input_embeddings()(ids.gather(1, index))
    return {"question": embeds[image_rows], "question_mask": qmask[image_rows]}


def shorten(kwargs: dict, keep: Tensor, valid: Tensor, pad: int | None) -> tuple[dict, Tensor, Tensor]:
    """The prompt cut to the positions `keep` (B, L) marks, padding on the caller's side: (its
    input_ids, and attention mask where one is needed; its real tokens (B, L'); the position (B, L')
    in the caller's prompt of each of its positions)."""
    ids = kwargs["input_ids"]
    length = int(keep.sum(1).max())
    order = ahead(~keep)[:, -length:] if left_padded(valid) else ahead(keep)[:, :length]
    new_valid = keep.gather(1, order)
    out = {"input_ids": torch.where(new_valid, ids.gather(1, order), 0 if pad is None else pad)}
    mask = kwargs.get("attention_mask")
    if mask is not None or not bool(new_valid.all()):
        out["attention_mask"] = new_valid.to(torch.long if mask is None else mask.dtype)
    return out, new_valid, order
