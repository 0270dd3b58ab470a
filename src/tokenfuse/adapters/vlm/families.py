"""Vision-language model families: where each keeps the parts the stages hook, as data.

A family is described from its inner model (the module holding the tower, the projector and the LLM,
whose forward the host's generate() calls; transformers' `LlavaModel` for LLaVA-1.5, `LlavaNextModel`
and `LlavaOnevisionModel` for the AnyRes families, see `anyres`), so that a new
family is an entry here plus the little that really differs (how its encoding seam is called, which
tower tokens its selection drops, how its positions are laid out). The stages (tower, boundary, llm,
decode) read these fields and nothing family-specific.

`UNSUPPORTED` names the vision-language families tokenfuse recognises but does not reduce (yet), so
that they are told as such (and not as an unknown text model, or an unknown method name).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from .anyres import NEXT, ONEVISION, AnyRes


@dataclass(frozen=True)
class Family:
    """Where one family keeps its parts, relative to its inner model.

    inner: class names of the inner model. tower, projector, llm: its sub-modules (vision tower,
    projector or merger, decoder LLM); layers: the LLM's decoder layers. placeholder: the config
    attribute holding the image placeholder token id. encode: the inner model's method that runs
    tower, layer selection and projector (the host's own seam, called with `encode_kwargs(config)`).
    feature_layer: (config) -> the tower layer whose output is selected (negative from the end).
    dropped: (config) -> leading tower tokens the selection drops ([CLS] under LLaVA's "default").
    positions: "1d": one position id per token (RoPE); "mrope": the 3-D multimodal positions of the
    Qwen-VL families, whose tower, boundary and deepstack stages are their own (`qwen`).
    views: the layout of an image made of several tower views (`anyres.AnyRes`: a base view and
    crops); None: one view per image, its tower tokens in order.
    """

    name: str
    inner: tuple[str, ...]
    tower: str
    projector: str
    llm: str
    layers: str
    placeholder: str
    encode: str
    encode_kwargs: Callable[[Any], dict[str, Any]]
    feature_layer: Callable[[Any], Any]
    dropped: Callable[[Any], int]
    positions: Literal["1d", "mrope"] = "1d"
    views: AnyRes | None = None


def _llava_encode_kwargs(config) -> dict[str, Any]:
    return {
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
    }


def _llava_feature_layer(config) -> Any:
    return config.vision_feature_layer


def _llava_dropped(config) -> int:
    return 1 if config.vision_feature_select_strategy == "default" else 0


# functions, not lambdas: a patched model is pickled with its patch, and so with its family
LLAVA = Family(
    "llava",
    inner=("LlavaModel",),
    tower="vision_tower",
    projector="multi_modal_projector",
    llm="language_model",
    layers="language_model.layers",
    placeholder="image_token_id",
    encode="get_image_features",
    encode_kwargs=_llava_encode_kwargs,
    feature_layer=_llava_feature_layer,
    dropped=_llava_dropped,
)
LLAVA_NEXT = dataclasses.replace(LLAVA, name="llava-next", inner=("LlavaNextModel",), views=NEXT)
LLAVA_ONEVISION = dataclasses.replace(
    LLAVA, name="llava-onevision", inner=("LlavaOnevisionModel",), views=ONEVISION
)


def _no_kwargs(config) -> dict[str, Any]:
    return {}


def _last_layer(config) -> int:
    return -1


def _no_drop(config) -> int:
    return 0


def _qwen(name: str, inner: str) -> Family:
    """A Qwen-VL family: the tower (`visual`) ends in its merger, whose output tokens the boundary
    operator reduces; every tower token is kept (no [CLS])."""
    return Family(
        name,
        inner=(inner,),
        tower="visual",
        projector="visual.merger",
        llm="language_model",
        layers="language_model.layers",
        placeholder="image_token_id",
        encode="get_image_features",
        encode_kwargs=_no_kwargs,
        feature_layer=_last_layer,
        dropped=_no_drop,
        positions="mrope",
    )


QWEN2_VL = _qwen("qwen2-vl", "Qwen2VLModel")
QWEN2_5_VL = _qwen("qwen2.5-vl", "Qwen2_5_VLModel")
QWEN3_VL = _qwen("qwen3-vl", "Qwen3VLModel")
FAMILIES = (LLAVA, LLAVA_NEXT, LLAVA_ONEVISION, QWEN2_VL, QWEN2_5_VL, QWEN3_VL)

#: model_type of vision-language models tokenfuse recognises but does not reduce (yet): their name
UNSUPPORTED = {
    "qwen3_vl_moe": "Qwen3-VL-MoE",
    "llava_next_video": "LLaVA-NeXT-Video",
    "idefics2": "Idefics2",
    "idefics3": "Idefics3",
    "smolvlm": "SmolVLM",
    "gemma3": "Gemma 3",
    "gemma3n": "Gemma 3n",
    "paligemma": "PaliGemma",
    "internvl": "InternVL",
    "internvl_chat": "InternVL",
    "mllama": "Llama 3.2 Vision",
    "mistral3": "Mistral 3",
    "pixtral": "Pixtral",
    "aya_vision": "Aya Vision",
    "blip-2": "BLIP-2",
    "instructblip": "InstructBLIP",
    "fuyu": "Fuyu",
    "kosmos-2": "Kosmos-2",
    "chameleon": "Chameleon",
    "janus": "Janus",
}


def family_of(model: nn.Module) -> tuple[Family, nn.Module] | None:
    """(family, inner model) of a supported vision-language model (the full model or its inner one),
    None for any other model."""
    for inner in (getattr(model, "model", None), model):
        for family in FAMILIES:
            if inner is not None and type(inner).__name__ in family.inner:
                return family, inner
    return None


def unsupported_name(model: nn.Module) -> str | None:
    """The family name of a vision-language model tokenfuse does not support, None otherwise."""
    return UNSUPPORTED.get(getattr(getattr(model, "config", None), "model_type", None))


def supported() -> list[str]:
    return [f"{f.name} ({', '.join(f.inner)})" for f in FAMILIES]


def has_cls(tower: nn.Module) -> bool:
    """Whether the vision tower puts a [CLS] token first (CLIP's class_embedding, ViT / DINOv2's
    cls_token); SigLIP towers have none."""
    return any(hasattr(m, "class_embedding") or hasattr(m, "cls_token") for m in tower.modules())
