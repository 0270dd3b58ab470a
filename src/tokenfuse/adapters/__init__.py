"""Adapters know models: where layers, attention blocks and keys are. They never reimplement them.

Each forward keeps its token state apart from every other (`base.Forward`, one per pass, in a
per-thread slot), so one patched model serves concurrent threads, direct `forward()` calls, deep
copies and pickling."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..methods import Method
from . import hf_text, llava, vision
from .base import Patch


def install(model: nn.Module, method: Method, protect_ids: Sequence[int] = ()) -> Patch:
    if llava.llava_model(model) is not None:
        raise TypeError(
            "this is a vision-language model: reduce its visual tokens with a visual-token operator "
            "(tokenfuse.apply(model, 'visionzip', keep=0.25)), and its vision tower with vision='tome'"
        )
    family = hf_text.family_of(model)
    if family is not None:
        return hf_text.TextPatch(model, family, method, protect_ids)
    family = vision.family_of(model)
    if family is not None:
        if protect_ids:
            raise ValueError("protect_ids names text token ids; vision models protect [CLS] and registers")
        return vision.VisionPatch(model, family, method)
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    raise TypeError(
        f"tokenfuse does not support {kind!r} models; supported: {', '.join(hf_text.supported())} "
        f"(Hugging Face text encoders), {', '.join(vision.supported())} (vision transformers), "
        "llava (LlavaForConditionalGeneration), and SentenceTransformers wrapping one of the text encoders"
    )
