"""One pass of a patched vision-language model, and the one place where state travels on host objects.

A pass is one call of the inner model (a prompt, or a decoding step). Everything it knows lives in
one `Pass`, which the inner model's pre-hook opens in this thread's slot and its hook closes
(`adapters.hooks.Hooks`); the stages read and write that object only.

Two things must outlive the pass that made them, so they travel on the host object that outlives it,
always under the one attribute `CARRIED`:
- a tower run (`tower.TowerRun`), on the image-features object the host's encoding seam returns:
  generate() encodes the images before the prefill that uses them, outside any pass;
- a reduced prefill's record (`decode.Record`), on its KV cache: each later decoding step, whose
  mask and positions the caller grows from the unreduced prompt, is translated by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

from ...core import Tokens
from ..engine import ahead

CARRIED = "_tokenfuse"
T = TypeVar("T")


def carry(host: object, value: object) -> None:
    """Leave `value` on a host object that outlives the pass (see the module docstring)."""
    setattr(host, CARRIED, value)


def carried(host: object, kind: type[T]) -> T | None:
    """What a pass left on `host`, if it is a `kind`; None otherwise."""
    value = getattr(host, CARRIED, None)
    return value if isinstance(value, kind) else None


@dataclass(eq=False)
class Layout:
    """The LLM's token layout during a prompt pass, each (B, L) in that layout: valid (real tokens),
    visual (visual tokens), question (each row's question: real text after its last visual token),
    slot (the visual token each position holds, as image x tokens per image + its index in the
    image's tower output; -1 elsewhere; None when the tower merged them). call: what the layers of this
    layout are called with (attention mask, rotary angles, position ids); None: the host's own."""

    valid: Tensor
    visual: Tensor
    question: Tensor
    slot: Tensor | None
    call: dict | None = None

    def take(self, at: Tensor, valid: Tensor) -> Layout:
        """The layout of the tokens at positions `at` (B, L') of this one, `valid` marking the real
        ones (any index at padding)."""
        slot = None if self.slot is None else torch.where(valid, self.slot.gather(1, at), -1)
        return Layout(
            valid=valid,
            visual=self.visual.gather(1, at) & valid,
            question=self.question.gather(1, at) & valid,
            slot=slot,
            call=self.call,
        )


@dataclass(eq=False)
class Pass:
    """One pass of the patched model.

    layout: the LLM's current layout (None on a decoding step or before the prompt is known).
    left: whether rows are left-padded. visual0: (B,) visual tokens entering the LLM.
    images, per_image: images in the prompt and the most placeholders one had in the caller's prompt
    (each image's slots start at image x per_image, see `Layout.slot`).
    boundary: the images' tokens after the boundary (B_img rows). tower_trace: (tower layers, B_img)
    tokens entering each tower layer, when the images were encoded by this patch.
    llm_trace: (first LLM layer, tokens per row) for each layout. scoring: the input of the
    attention that scores the next in-LLM stage. stage: the next in-LLM stage; stages: those done.
    record: the decoding record (a reduced prefill's, or the one a decoding step follows).
    step_mask: a decoding step's (stage, attention mask) for layers after that stage.
    lengths: (images,) placeholders each image had in the caller's prompt, where known; newline:
    (images, per_image) which of them are newline tokens (AnyRes images; None: none).
    deepstack: Qwen3-VL's deepstack features and each visual token's row in them, while the
    in-LLM stage adds them itself (see `deepstack`).
    """

    layout: Layout | None = None
    left: bool = False
    visual0: Tensor | None = None
    images: int = 0
    per_image: int = 0
    boundary: Tokens | None = None
    tower_trace: Tensor | None = None
    llm_trace: list[tuple[int, Tensor]] = field(default_factory=list)
    scoring: dict | None = None
    stage: int = 0
    stages: list = field(default_factory=list)
    record: object | None = None
    step_mask: tuple | None = None
    lengths: Tensor | None = None
    newline: Tensor | None = None
    deepstack: tuple | None = None

    def kept(self) -> list[Tensor]:
        """Per image, in prompt order: the indices (sorted) of its visual tokens that the LLM's last
        layout holds, counted in the image's tower output (0 .. per_image - 1)."""
        if self.layout is None or self.images == 0:
            return []
        if self.layout.slot is None:
            raise TypeError(
                "a token method in the vision tower merged the images' tokens, so a kept token stands "
                "for several patches and has no single index: read the counts (patch.last.boundary.size)"
            )
        slots = self.layout.slot[self.layout.valid & self.layout.visual].sort().values
        image = torch.div(slots, self.per_image, rounding_mode="floor")
        return [slots[image == i] - i * self.per_image for i in range(self.images)]


def rows(chosen: Tensor) -> tuple[Tensor, Tensor]:
    """(B, Q) the positions of each row's chosen tokens (B, N), in order, and (B, Q) which of them
    are real (rows with fewer are padded)."""
    width = max(int(chosen.sum(1).max()), 1)
    index = ahead(chosen)[:, :width]
    return index, chosen.gather(1, index)


def image_index(placeholder: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """(B, L) each placeholder's image and its index among that image's placeholders, images filling
    their `lengths` (images,) placeholders in prompt order (meaningless elsewhere)."""
    flat = placeholder.flatten().cumsum(0).view_as(placeholder) - 1
    ends = lengths.cumsum(0)
    image_of = torch.searchsorted(ends, flat, right=True).clamp(0, max(len(lengths) - 1, 0))
    return image_of, flat - (ends - lengths)[image_of]


def question(visual: Tensor, valid: Tensor) -> Tensor:
    """(B, L) the question of each row: real non-visual tokens after its last visual token."""
    position = torch.arange(visual.shape[1], device=visual.device)
    last_visual = torch.where(visual, position, -1).max(1).values
    has = visual.any(1)
    return valid & ~visual & (position[None] > last_visual[:, None]) & has[:, None]
