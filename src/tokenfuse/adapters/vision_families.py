"""The vision transformer families `vision.VisionPatch` serves, as data: where each keeps its tower,
embeddings and blocks, its attention projections and its protected prefix ([CLS], distillation and
register tokens), and which models belong to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """Where one family of vision transformers keeps its parts, relative to its base model.

    embeddings: module whose output is the token sequence entering the first layer.
    layer: class names of the pre-norm blocks this adapter knows; the model's list of them is found
    by type, and any other block is refused.
    mlp_in: the norm before the MLP; mlp_out: the last module of the MLP branch.
    qkv: the query, key, value projections, or one fused projection.
    tower: the attribute holding the vision tower in models that have other parts (dual encoders).
    has_cls: whether a [CLS] token leads the patches (SigLIP: none, every token is a patch).
    """

    name: str
    embeddings: str
    layer: tuple[str, ...]
    mlp_in: str
    mlp_out: str
    qkv: tuple[str, ...]
    mask_arg: str = "attention_mask"
    tower: str | None = None
    has_cls: bool = True


HF_VIT = Family(
    "hf-vit",
    embeddings="embeddings",
    layer=("ViTLayer", "DeiTLayer"),
    mlp_in="layernorm_after",
    mlp_out="mlp",
    qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
)
HF_DINOV2 = Family(
    "hf-dinov2",
    embeddings="embeddings",
    layer=("Dinov2Layer", "Dinov2WithRegistersLayer"),
    mlp_in="norm2",
    mlp_out="layer_scale2",
    qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
)
TIMM = Family(
    "timm",
    embeddings="norm_pre",
    layer=("Block",),
    mlp_in="norm2",
    mlp_out="drop_path2",
    qkv=("attn.qkv",),
    mask_arg="attn_mask",
)
HF_CLIP = Family(
    "hf-clip",
    embeddings="pre_layrnorm",  # what enters the first layer: the host's pre-norm runs on every patch
    layer=("CLIPEncoderLayer",),
    mlp_in="layer_norm2",
    mlp_out="mlp",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    tower="vision_model",
)
HF_SIGLIP = Family(
    "hf-siglip",
    embeddings="embeddings",
    layer=("SiglipEncoderLayer",),
    mlp_in="layer_norm2",
    mlp_out="mlp",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    tower="vision_model",
    has_cls=False,
)
HF_TYPES = {
    "vit": HF_VIT,
    "deit": HF_VIT,
    "dinov2": HF_DINOV2,
    "dinov2_with_registers": HF_DINOV2,
    "clip_vision_model": HF_CLIP,
    "clip": HF_CLIP,
    "siglip_vision_model": HF_SIGLIP,
    "siglip": HF_SIGLIP,
}


def is_timm_vit(model: nn.Module) -> bool:
    return type(model).__name__ == "VisionTransformer" and type(model).__module__.startswith("timm.")


def family_of(model: nn.Module) -> Family | None:
    if is_timm_vit(model):
        return TIMM
    return HF_TYPES.get(getattr(getattr(model, "config", None), "model_type", None))


def supported() -> list[str]:
    return [*HF_TYPES, "timm VisionTransformer"]


def tower_of(model: nn.Module, family: Family) -> nn.Module:
    """The module holding the vision embeddings and blocks: the base model, or its vision tower
    where the model has other parts (CLIPModel's text model has blocks of the same type)."""
    base = model if family is TIMM else model.base_model
    return getattr(base, family.tower, base) if family.tower else base


def prefix_tokens(model: nn.Module, family: Family) -> int:
    """[CLS], distillation and register tokens ahead of the patches: never reduced."""
    if is_timm_vit(model):
        return model.num_prefix_tokens
    if not family.has_cls:
        return 0
    config = model.config
    if config.model_type == "deit":
        return 2
    return 1 + getattr(config, "num_register_tokens", 0)


def find_layers(base: nn.Module, family: Family) -> nn.ModuleList | nn.Sequential:
    """The model's list of blocks, all of a known type and layout, or a clear refusal."""
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList | nn.Sequential) and len(m)]
    layers = next((m for m in lists if type(m[0]).__name__ in family.layer), None)
    if layers is None or any(type(layer).__name__ not in family.layer for layer in layers):
        found = sorted({type(m[0]).__name__ for m in lists})
        raise TypeError(
            f"tokenfuse knows {family.name} blocks of type {', '.join(family.layer)}, this model has "
            f"{', '.join(found) or 'none'}; its computation may differ, so it is not patched"
        )
    for path in (family.mlp_in, family.mlp_out, *family.qkv):
        try:
            layers[0].get_submodule(path)
        except AttributeError:
            raise TypeError(
                f"{type(layers[0]).__name__} has no {path!r}: this library version lays out its blocks "
                "differently from the one tokenfuse was tested with (transformers >= 5.18, timm 1.0)"
            ) from None
    return layers
