"""The vision-tower stage: a token method inside the tower (through the vision adapter), and what the
boundary stage reads from a tower run: the patch grid, the [CLS] queries and keys the scoring
operators need, the projector's input and the tokens entering each tower layer.

A tower run is a pass of its own: generate() encodes the images before the prefill that uses them,
outside any pass of the inner model. It opens at the tower's pre-hook, is complete at the projector's
pre-hook, and travels on the features object the encoding seam returns (`state.carry`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ...core import Tokens
from ...methods import Method, VisualMethod
from .. import vision, vision_families
from . import families
from .state import carried, carry

if TYPE_CHECKING:
    from . import VlmPatch

#: what an operator reads from the tower's attention: [CLS] queries (and keys)
SCORED = frozenset({"cls_attention", "cls_attention_layers", "keys"})
CLS_SCORED = frozenset({"cls_attention", "cls_attention_layers"})


@dataclass(eq=False)
class TowerRun:
    """One run of the patched vision tower.

    full: patches per image of the caller's pixels (the budget's base). grid: (h, w) of the pixels the
    tower saw. qk: captured [CLS] queries and keys per tower layer (B, H, *, D). selected: (B, N, C)
    the projector's input. tokens: the vision adapter's final tokens when the tower reduces.
    layer_tokens: (layers, B) tokens entering each tower layer. inputs: the encoding seam's arguments
    that fix a multi-view family's layout (`Family.views`), recorded by `Seam`."""

    full: int
    grid: tuple[int, int]
    layer_tokens: Tensor | None = None
    inputs: dict = field(default_factory=dict)
    qk: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    selected: Tensor | None = None
    tokens: Tokens | None = None


class Tower:
    """The tower stage of `patch`: its hooks, and the vision adapter's patch running the tower token
    method (`vision`, None without one)."""

    def __init__(self, patch: VlmPatch, boundary: VisualMethod | None, method: Method | None):
        self.patch = patch
        inner, family = patch.inner, patch.family
        self.module = inner.get_submodule(family.tower)
        self.heads = patch.config.vision_config.num_attention_heads
        self.patch_size = patch.config.vision_config.patch_size
        feature_layer = family.feature_layer(patch.config)
        if not isinstance(feature_layer, int):
            raise ValueError(f"tokenfuse supports {family.name} models that select one vision feature layer")
        self.attention = self._attention()
        self.layers = len(self.attention)
        self.selected = feature_layer
        self.feature_layer = feature_layer % (self.layers + 1) - 1  # hidden_states[0]: the embeddings
        self.has_cls = families.has_cls(self.module)
        if family.views is not None:
            family.views.check(boundary, method)
        if boundary is not None:
            self._check_cls(boundary)
            boundary.check(self.feature_layer + 1)
        self.vision = None if method is None else self._token_method(method, boundary)

    def _attention(self) -> list[nn.Module]:
        """Each tower layer's attention module (the one holding q_proj and k_proj)."""
        found = [m for m in self.module.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")]
        if not found:
            raise TypeError(f"no q_proj/k_proj attention found in {type(self.module).__name__}")
        return found

    def _check_cls(self, boundary: VisualMethod) -> None:
        """Operators that score by the [CLS] query's attention need a tower that has one."""
        scored = boundary.needs & CLS_SCORED
        if scored and not self.has_cls and not boundary.cls_substitute:
            raise ValueError(
                f"{boundary.name} scores each visual token by the [CLS] token's attention "
                f"({', '.join(sorted(scored))}), and this vision tower ({type(self.module).__name__}) has no "
                "[CLS] token: its first patch would stand in for it silently. Choose an operator that "
                "does not read [CLS] attention (pool, random, resize, aim, divprune, fastv, sparsevlm)"
            )

    def _token_method(self, method: Method, boundary: VisualMethod | None) -> vision.VisionPatch:
        if self.feature_layer != self.layers - 1:
            raise ValueError(
                "reducing in the vision tower needs the config to select the tower's last layer "
                f"(vision_feature_layer -1), this one selects {self.selected}"
            )
        family = vision_families.family_of(self.module)
        if family is None:
            raise TypeError(f"the vision tower {type(self.module).__name__} has no tokenfuse adapter")
        scored = boundary.needs & SCORED if boundary else None
        if scored:
            raise ValueError(
                f"{boundary.name} scores with the tower's attention ({', '.join(sorted(scored))}), "
                "whose tokens a vision-tower method changes inside each layer: combine the tower method "
                "with an operator that does not read it (random, resize, fastv, sparsevlm, aim-prune)"
            )
        return vision.VisionPatch(self.module, family, method)

    def install(self, needs: frozenset[str]) -> None:
        patch = self.patch
        if patch.family.views is not None:  # generate() encodes with arguments the prefill never sees
            setattr(patch.inner, patch.family.encode, Seam(patch.inner, patch.family))
        patch.before(self.module, self._begin, kwargs=True)
        patch.after(self.module, self._end)
        patch.before(patch.inner.get_submodule(patch.family.projector), self._selected)
        wanted = range(self.feature_layer + 1) if "cls_attention_layers" in needs else [self.feature_layer]
        if needs & SCORED:
            for i in wanted:
                for name in ("q_proj", "k_proj"):
                    keep = partial(self._keep, i, name[0])
                    patch.after(getattr(self.attention[i], name), keep, first=False)

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict):
        """Tower pre-hook: a tower run opens; the `resize` baseline changes the pixels here."""
        patch = self.patch
        if not patch.reduces_images() and patch.family.views is None:
            return None
        pixels = args[0] if args else kwargs["pixel_values"]
        size = self.patch_size
        full = (pixels.shape[-2] // size) * (pixels.shape[-1] // size)
        resized = patch.boundary.pixels(pixels, size) if patch.boundary is not None else None
        if resized is not None:
            pixels = resized
            args, kwargs = (
                ((pixels, *args[1:]), kwargs) if args else (args, {**kwargs, "pixel_values": pixels})
            )
            if "interpolate_pos_encoding" in inspect.signature(module.forward).parameters:
                kwargs = {**kwargs, "interpolate_pos_encoding": True}  # CLIP, SigLIP: positions for the grid
        patch.slots.tower = TowerRun(full=full, grid=(pixels.shape[-2] // size, pixels.shape[-1] // size))
        return args, kwargs

    def _end(self, module: nn.Module, args: tuple, out) -> None:
        run = getattr(self.patch.slots, "tower", None)
        if run is None:
            return
        if self.vision is None:
            hidden = out.last_hidden_state
            run.layer_tokens = torch.full((self.layers, hidden.shape[0]), hidden.shape[1])
        else:
            run.tokens, run.layer_tokens = self.vision.tokens, self.vision.layer_tokens()[:, 0]
        carry(out, run)  # the output object the encoding seam returns

    def _keep(self, layer: int, name: str, module: nn.Module, args: tuple, out: Tensor) -> None:
        """Forward hook of a tower q/k projection: keep the [CLS] query or all keys, per head."""
        run = getattr(self.patch.slots, "tower", None)
        if run is None:
            return
        B, N, C = out.shape
        heads = self.heads
        per_head = (out[:, :1] if name == "q" else out).view(B, -1, heads, C // heads).transpose(1, 2)
        run.qk.setdefault(layer, {})[name] = per_head

    def _selected(self, module: nn.Module, args: tuple) -> None:
        """Projector pre-hook: its input is the selected features; the tower run is complete."""
        run = getattr(self.patch.slots, "tower", None)
        if run is not None:
            run.selected = args[0]
            self.patch.slots.tower = None

    def remove(self) -> None:
        if self.vision is not None:
            self.vision.remove()
        self.patch.inner.__dict__.pop(self.patch.family.encode, None)


class Seam:
    """The host's encoding seam (`Family.encode`), set on the inner model: the host's own method,
    whose tower run also records the arguments that fix the images' layout (`Family.views.inputs`)."""

    def __init__(self, inner: nn.Module, family: families.Family):
        self.inner, self.family = inner, family

    @property
    def __signature__(self) -> inspect.Signature:
        """The host method's: generate() passes it the model inputs its signature names."""
        return inspect.signature(getattr(type(self.inner), self.family.encode).__get__(self.inner))

    def __call__(self, *args, **kwargs):
        out = getattr(type(self.inner), self.family.encode)(self.inner, *args, **kwargs)
        run = carried(out, TowerRun)
        if run is not None:
            run.inputs = {k: kwargs.get(k) for k in self.family.views.inputs}
            if len(args) > 1:  # (pixel_values, image_sizes) given by position
                run.inputs["image_sizes"] = args[1]
        return out
