"""Adapters know models: where layers, attention blocks and keys are. They never reimplement them.

`install` is the one place that decides which adapter a model gets (`target`): a Hugging Face text
encoder, a vision transformer, a SentenceTransformer around a text encoder, or a vision-language model
of a supported family; every other model, and every vision-language family not supported yet, is
refused here with its name and the supported ones. Every patch meets `protocol.Installed`.

Each forward keeps its token state apart from every other (one state object per pass, in a
per-thread slot), so one patched model serves concurrent threads, direct `forward()` calls, deep
copies and pickling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

from ..methods import Method, VisualMethod
from . import hf_text, text_families, vision, vision_families, vlm
from .engine import Patch
from .protocol import Installed
from .sentence_transformers import SentencePatch, encoder_of
from .vlm import VlmPatch, families

Target = Literal["text", "vision", "sentence-transformers", "vlm"]

__all__ = ["Installed", "Patch", "SentencePatch", "Target", "VlmPatch", "encoder_of", "install", "target"]


def target(model: nn.Module) -> Target:
    """Which adapter `model` gets; a TypeError naming the model and what is supported for any other."""
    if families.family_of(model) is not None:
        return "vlm"
    name = families.unsupported_name(model)
    if name is not None:
        raise TypeError(
            f"this is a {name} model ({type(model).__name__}), a vision-language model that tokenfuse "
            f"does not support yet; supported vision-language families: {', '.join(families.supported())}"
        )
    if encoder_of(model) is not None:
        return "sentence-transformers"
    if text_families.family_of(model) is not None:
        return "text"
    if vision_families.family_of(model) is not None:
        return "vision"
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    raise TypeError(
        f"tokenfuse does not support {kind!r} models; supported: {', '.join(text_families.supported())} "
        f"(Hugging Face text encoders), {', '.join(vision_families.supported())} (vision transformers), "
        f"{', '.join(families.supported())} (vision-language models), and SentenceTransformers wrapping "
        "one of the text encoders"
    )


def install(
    model: nn.Module,
    method: Method | Sequence[VisualMethod],
    protect_ids: Sequence[int] = (),
    vision_method: Method | None = None,
) -> Installed:
    """Install the adapter `target` picks. Encoders and SentenceTransformers: a token `method`, with
    `protect_ids`. Vision-language models: `method` the visual-token operators (at most one boundary
    and one in-LLM), `vision_method` a token method for the vision tower."""
    kind = target(model)
    if kind == "vlm":
        if isinstance(method, Method):
            raise TypeError(
                "this is a vision-language model: reduce its visual tokens with a visual-token operator "
                "(tokenfuse.apply(model, 'visionzip', keep=0.25)), and its vision tower with vision='tome'"
            )
        return vlm.VlmPatch(model, list(method), vision_method)
    if vision_method is not None:
        raise ValueError(f"a vision-tower method applies to vision-language models; this is a {kind} model")
    if kind == "sentence-transformers":
        encoder = encoder_of(model)
        return SentencePatch(
            model, hf_text.TextPatch(encoder, text_families.family_of(encoder), method, protect_ids)
        )
    if kind == "text":
        return hf_text.TextPatch(model, text_families.family_of(model), method, protect_ids)
    if protect_ids:
        raise ValueError("protect_ids names text token ids; vision models protect [CLS] and registers")
    return vision.VisionPatch(model, vision_families.family_of(model), method)
