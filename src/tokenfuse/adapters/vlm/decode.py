"""The decoding stage: steps after a reduced prefill, over its reduced KV cache.

A reduced prefill leaves a `Record` on its own cache (`state.carry`). The caller (generate() or a
hand-written loop) grows each step's attention mask and position ids from the unreduced prompt; each
step is translated to the cache: the prompt part of the mask becomes the reduced prompt's, positions
move down by the real tokens the boundary removed, and layers after an in-LLM stage (whose cache holds
that stage's layout) get the stage's mask for the prompt part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .state import Pass

if TYPE_CHECKING:
    from . import VlmPatch


@dataclass(eq=False)
class Stage:
    """An in-LLM reduction of one prefill: from decoder layer `layer` on, the cache holds tokens
    laid out as `valid` (B, Lj) says (False: a padding slot)."""

    layer: int
    valid: Tensor


@dataclass(eq=False)
class Record:
    """What decoding needs from a reduced prefill, kept on that generation's cache.

    length: the prompt length the caller counts. prefix: (B, Lb) mask of the prompt the LLM saw.
    shift: (B, 1) real prompt tokens removed at the boundary: later positions move down by it.
    """

    length: int
    prefix: Tensor
    shift: Tensor
    stages: list[Stage] = field(default_factory=list)


class Decode:
    """The decoding stage of `patch`."""

    def __init__(self, patch: VlmPatch):
        self.patch = patch

    def step(self, fwd: Pass, record: Record, kwargs: dict) -> dict:
        """A step after a reduced prefill: the caller's mask and positions, translated."""
        fwd.record = record
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([record.prefix.to(mask.dtype), mask[:, record.length :]], 1)
        elif mask is None and not bool(record.prefix.all()):
            cache = kwargs["cache"]
            ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            grown = cache.get_seq_length() - record.prefix.shape[1] + ids.shape[1]
            kwargs["attention_mask"] = torch.cat(
                [record.prefix.long(), record.prefix.new_ones(ids.shape[0], grown).long()], 1
            )
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] - record.shift.to(kwargs["position_ids"].device)
        return kwargs

    def layer(self, fwd: Pass, i: int, args: tuple, kwargs: dict):
        """A decoding step in a layer after an in-LLM stage: its cache holds the stage's layout, so the
        prompt part of the mask is the stage's, the part of the generated tokens the host's."""
        stage = next((s for s in reversed(fwd.record.stages) if s.layer <= i), None)
        if stage is None:
            return None
        host = kwargs.get("attention_mask")
        if host is None and bool(stage.valid.all()):
            return None
        config = self.patch.config.text_config
        if fwd.step_mask is None or fwd.step_mask[0] is not stage:
            prefix = fwd.record.prefix.shape[1]
            if host is None:  # no padding: the new tokens see each other causally
                t = (args[0] if args else kwargs["hidden_states"]).shape[1]
                grown_len = kwargs["cache"].get_seq_length(0) - prefix
                key = torch.arange(grown_len, device=stage.valid.device)
                query = torch.arange(t, device=stage.valid.device) + grown_len - t
                grown = (key[None] <= query[:, None])[None, None].expand(stage.valid.shape[0], 1, -1, -1)
                grown = host_format(grown, None, config)
            else:
                grown = host[..., prefix:]
            old = stage.valid[:, None, None, :].expand(-1, 1, grown.shape[2], -1)
            fwd.step_mask = (stage, torch.cat([host_format(old, grown, config), grown], -1))
        return args, {**kwargs, "attention_mask": fwd.step_mask[1]}


def host_format(allowed: Tensor, host: Tensor | None, config) -> Tensor:
    """A boolean mask (True = attend) in the host's format: boolean for SDPA, additive for eager."""
    if (
        host is not None
        and host.dtype == torch.bool
        or host is None
        and config._attn_implementation == "sdpa"
    ):
        return allowed
    dtype = host.dtype if host is not None else torch.float32
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
