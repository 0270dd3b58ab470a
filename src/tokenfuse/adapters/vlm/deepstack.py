"""Qwen3-VL's deepstack (Meng et al. 2024, "DeepStack"): features of intermediate tower layers, merged
like the last layer's, added to the hidden states at the visual positions after each of the first
decoder layers (one layer per deepstack level).

At the boundary the deepstack features of each image are reduced with the image's own reduction
(`qwen.QwenBoundary`), so the host adds them at the kept tokens. When an in-LLM stage reduces the
sequence before the last deepstack layer, the host's positions (its `visual_pos_masks`, in the layout
the LLM started with) no longer fit: these hooks then take the features from the host and add them
after each deepstack layer at the visual tokens of the layout that layer ran with, each kept token
its own feature rows, as the host's `_deepstack_process` does (hidden[visual] += features).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from . import VlmPatch


def install(patch: VlmPatch) -> None:
    """Install the hooks on a Qwen3-VL patch whose in-LLM stage starts before the last deepstack layer
    (other families and settings: nothing to do, the host adds the features itself)."""
    levels = len(getattr(patch.config.vision_config, "deepstack_visual_indexes", None) or ())
    stages = patch.llm.stages
    if not stages or stages[0][0] >= levels:
        return
    patch.before(patch.inner.get_submodule(patch.family.llm), partial(_take, patch), kwargs=True)
    for i, layer in enumerate(patch.llm.layers[:levels]):
        patch.after(layer, partial(_add, patch, i))


def _take(patch: VlmPatch, module: nn.Module, args: tuple, kwargs: dict):
    """LLM pre-hook: keep the deepstack features in the pass, with each visual token's feature row
    (found through its slot, which follows it through every re-layout), and withhold them from the host."""
    fwd = patch.current()
    features = kwargs.get("deepstack_visual_embeds")
    if fwd is None or fwd.layout is None or features is None or not patch.llm.reduces(fwd):
        return None
    layout = fwd.layout
    visual = kwargs["visual_pos_masks"]
    row = torch.full((fwd.images * fwd.per_image,), -1, dtype=torch.long, device=visual.device)
    row[layout.slot[visual]] = torch.arange(int(visual.sum()), device=visual.device)
    fwd.deepstack = (row, features)
    return args, {**kwargs, "deepstack_visual_embeds": None, "visual_pos_masks": None}


def _add(patch: VlmPatch, level: int, module: nn.Module, args: tuple, out: Tensor):
    """Forward hook of deepstack layer `level`: its features added at the current layout's visual
    tokens."""
    fwd = patch.current()
    if fwd is None or fwd.layout is None or fwd.deepstack is None:
        return None
    row, features = fwd.deepstack
    layout = fwd.layout
    visual = layout.visual & layout.valid
    added = features[level].to(out.device, out.dtype)[row[layout.slot[visual]]]
    out = out.clone()
    out[visual] = out[visual] + added
    return out
