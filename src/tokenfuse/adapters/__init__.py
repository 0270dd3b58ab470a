"""Adapters know models: where layers, attention blocks and keys are. They never reimplement them."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..methods import Method
from . import hf_text

Patch = hf_text.TextPatch


def install(model: nn.Module, method: Method, protect_ids: Sequence[int] = ()) -> Patch:
    family = hf_text.family_of(model)
    if family is None:
        kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise TypeError(
            f"tokenfuse does not support {kind!r} models; supported families: "
            f"{', '.join(hf_text.supported())} (Hugging Face encoders)"
        )
    return hf_text.TextPatch(model, family, method, protect_ids)
