"""Vision-language models (LLaVA-1.5's `LlavaForConditionalGeneration`, with any vision tower and
decoder LLM that class accepts; `families` says where each family keeps its parts): visual tokens
reduced in the vision tower (a token method, through the vision adapter), at the tower-to-LLM boundary
and inside the LLM, in any combination, and decoding continued over the reduced cache.

This module only wires the stages (`tower`, `boundary`, `llm`, `decode`, one module each, shared by
every family) to the model, and opens and closes a pass (`state.Pass`) around each call of the inner
model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...methods import Method, VisualMethod
from ..engine import check_attention, left_padded
from ..hooks import Hooks
from . import deepstack
from .boundary import Boundary
from .decode import Decode, Record
from .families import Family, family_of
from .llm import InLLM, host_module
from .qwen import QwenBoundary, QwenTower
from .state import Layout, Pass, carried, carry, image_index, question
from .tower import Tower, TowerRun

_ARGS = ("input_ids", "pixel_values", "attention_mask", "position_ids", "cache", "inputs_embeds")


class VlmPatch(Hooks):
    """Visual-token reduction installed on a vision-language model: at most one boundary and one
    in-LLM operator (`methods`), and `tower_method`, a token method run in the vision tower."""

    state_type = Pass

    def __init__(self, model: nn.Module, methods: list[VisualMethod], tower_method: Method | None = None):
        super().__init__()
        found = family_of(model)
        if found is None:
            raise TypeError("not a supported vision-language model (tokenfuse.adapters.vlm.families)")
        self.family: Family = found[0]
        self.inner = inner = found[1]
        self.config = inner.config
        self.boundary = _one(methods, "boundary")
        self.llm = InLLM(self, _one(methods, "llm"))
        check_attention(inner.get_submodule(self.family.llm))
        qwen = self.family.positions == "mrope"  # the Qwen-VL families' own tower and boundary
        self.tower = (QwenTower if qwen else Tower)(self, self.boundary, tower_method)
        self.cross = (QwenBoundary if qwen else Boundary)(self, self.boundary)
        self.decode = Decode(self)
        if model is not inner:  # the model that computes a loss from labels
            self.before(model, self._no_labels, kwargs=True)
        self.before(inner, self._begin, kwargs=True)
        self.after(inner, self._end, kwargs=True)
        self.tower.install(self.boundary.needs if self.boundary is not None else frozenset())
        self.llm.install(self.decode.layer)
        if qwen:
            deepstack.install(self)

    @property
    def image_token(self) -> int:
        return getattr(self.config, self.family.placeholder)

    @property
    def slots(self):
        """This thread's slots: the open and last pass (`current`, `last`), and the open tower run
        (`tower`, see `tower`)."""
        return self._local

    @property
    def method(self) -> tuple[Method | VisualMethod, ...]:
        """What this patch applies, in stage order: tower method, boundary operator, in-LLM operator."""
        found = (self.tower.vision and self.tower.vision.method, self.boundary, self.llm.method)
        return tuple(m for m in found if m is not None)

    def remove(self) -> None:
        super().remove()
        self.tower.remove()

    def reduces(self) -> bool:
        """Whether anything is reduced: the images, or the sequence inside the LLM."""
        return self.reduces_images() or any(f < 1 for _, f in self.llm.stages)

    def reduces_images(self) -> bool:
        if self.tower.vision is not None:
            return True
        return self.boundary is not None and self.boundary.keep < 1.0

    def open(self, prompt: bool = True) -> Pass:
        """A pass starts. A decoding step's pass is current but does not become `last`, which stays
        the prompt's pass (what generate() reduced), the one the readers below report."""
        previous = self.last
        fwd = super().open()
        if not prompt:
            self.slots.last = previous
        return fwd

    # -- a pass -------------------------------------------------------------------------------
    def _no_labels(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Labels name one target per input position; a reduced prompt has fewer positions."""
        if kwargs.get("labels") is not None and self.reduces():
            raise ValueError(
                "labels= was given to a reduced vision-language model, whose logits cover the kept positions "
                "only (fewer than the prompt's), so the labels would not line up with them: compute the "
                "loss on the unreduced model (tokenfuse.remove(model)), or reduce at keep 1.0"
            )

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = {**dict(zip(_ARGS, args, strict=False)), **kwargs}
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        cache = kwargs.get("cache")
        record = carried(cache, Record)
        if record is not None:
            return (), self.decode.step(self.open(prompt=False), record, kwargs)
        if _continues(cache, kwargs):  # a step after an unreduced prefill: nothing to translate
            self.open(prompt=False)
            return (), kwargs
        if self.family.views is not None and self.reduces():
            self.family.views.refuse_video(kwargs)
        fwd = self.open()
        ids = kwargs.get("input_ids")
        if ids is None:
            if kwargs.get("pixel_values") is not None and self.reduces_images():
                raise ValueError(
                    "pass input_ids, not inputs_embeds, with pixel_values: tokenfuse finds each image's "
                    "placeholders in them to rebuild the shorter prompt"
                )
            return (), kwargs
        if cache is not None and cache.get_seq_length() > 0 and kwargs.get("pixel_values") is not None:
            raise ValueError("a reduced prompt cannot continue an unreduced cache: start a new cache")
        mask = kwargs.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        length = ids.shape[1]
        shift = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
        changed = False
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        images = kwargs.get("pixel_values") is not None or encoded
        if images is not None and self.reduces_images():
            kwargs, valid, shift, ids = self.cross.rebuild(fwd, module, kwargs, valid)
            changed = True
        elif images is not None and self.family.positions == "mrope":
            self.cross.count(fwd, kwargs, ids)
        elif images is not None:
            fwd.images = len(kwargs["pixel_values"] if encoded is None else encoded.pooler_output)
            fwd.per_image = int((ids == self.image_token).sum()) // max(fwd.images, 1)
            if self.family.views is not None:
                run = carried(encoded, TowerRun)
                self.cross.layout(
                    fwd, kwargs if run is None else run.inputs, fwd.images, ids == self.image_token
                )
        placeholder = (ids == self.image_token) & valid
        slot = self._slot(fwd, placeholder)
        visual = placeholder  # newlines (AnyRes) are not visual tokens: kept, like text
        if fwd.newline is not None:
            visual = placeholder & ~fwd.newline.flatten()[slot.clamp_min(0)]
        fwd.layout = Layout(valid=valid, visual=visual, question=question(placeholder, valid), slot=slot)
        fwd.visual0 = visual.sum(1)
        fwd.left = left_padded(valid)
        fwd.llm_trace = [(0, valid.sum(1))]
        changed = changed or self.llm.reduces(fwd)
        if changed and kwargs.get("use_cache", self.config.text_config.use_cache) and cache is None:
            llm = self.inner.get_submodule(self.family.llm)
            kwargs["cache"] = cache = host_module(llm).DynamicCache(config=self.config.text_config)
        if changed and cache is not None:
            fwd.record = Record(length=length, prefix=valid, shift=shift)
        return (), kwargs

    @staticmethod
    def _slot(fwd: Pass, visual: Tensor) -> Tensor | None:
        """(B, L) the visual token each placeholder holds (see `Layout.slot`): images fill their
        placeholders in prompt order, each with its kept tokens in order."""
        slot = visual.new_full(visual.shape, -1, dtype=torch.long)
        tokens = fwd.boundary
        if tokens is None and fwd.lengths is not None:  # images of different lengths
            image_of, index = image_index(visual, fwd.lengths)
            return torch.where(visual, image_of * fwd.per_image + index, -1)
        if tokens is None:
            slot[visual] = torch.arange(int(visual.sum()), device=visual.device)
            return slot
        if tokens.origin is None:
            return None
        offset = torch.arange(tokens.mask.shape[0], device=visual.device)[:, None] * fwd.per_image
        slot[visual] = (tokens.origin + offset)[tokens.mask]
        return slot

    def _end(self, module: nn.Module, args: tuple, kwargs: dict, out) -> None:
        fwd = self.current()
        if fwd is None:
            return
        cache = getattr(out, "cache", None)
        if fwd.record is not None and cache is not None and carried(cache, Record) is None:
            fwd.record.stages = fwd.stages
            carry(cache, fwd.record)
        fwd.scoring = None
        if fwd.layout is not None:
            fwd.layout.call = None
        self.slots.current = None

    # -- what a pass leaves readable (adapters.protocol) ----------------------------------------
    @property
    def tokens(self):
        raise TypeError(
            "a vision-language model returns one output per kept position, not pooled tokens, so it has "
            "no token sizes to read: read which visual tokens each image kept with tokenfuse.kept(model), "
            "and the tokens each layer processed with patch_of(model).layer_tokens()"
        )

    def kept(self) -> list[Tensor]:
        """Per image of this thread's last prompt, in prompt order: the indices of the visual tokens
        that reached the LLM's last layers, counted in the image's tower output."""
        if self.last is None:
            raise RuntimeError("no forward to read: run the model on a prompt first")
        return self.last.kept()

    @property
    def llm_trace(self) -> list[tuple[int, Tensor]]:
        """This thread's last prompt: (first LLM layer, tokens per row) for each layout it used."""
        return [] if self.last is None else self.last.llm_trace

    def layer_tokens(self) -> Tensor:
        """(LLM layers, 2, B) this thread's last prompt: tokens entering each LLM layer, twice (the
        in-LLM stage reduces between layers, at a layer's entry, never inside one)."""
        trace = self.llm_trace
        if not trace:
            raise RuntimeError("no prompt to read: run the model on a prompt first")
        out = trace[0][1].new_zeros(len(self.llm.layers), len(trace[0][1]))
        for layer, count in trace:
            out[layer:] = count
        return torch.stack([out, out], 1)


def _continues(cache, kwargs: dict) -> bool:
    """Whether a call continues a filled cache with no images: a decoding step, whose pass must not
    replace the prompt's as the one the readers report."""
    images = kwargs.get("pixel_values") is not None or kwargs.get("mm_encoder_outputs")
    return cache is not None and cache.get_seq_length() > 0 and not images


def _one(methods: list[VisualMethod], placement: str) -> VisualMethod | None:
    found = [m for m in methods if m.placement == placement]
    if len(found) > 1:
        raise ValueError(f"one {placement} operator at a time, got {[m.name for m in found]}")
    return found[0] if found else None
