"""Dense heads that read several layers: transformers' DINOv2 backbones (DPT, Depth Anything) and any
caller of output_hidden_states get every requested layer at full resolution, unmerged or rebuilt by
the method's own reconstruction (Expedite)."""

import pytest
import torch
from conftest import VIT, images, tiny_dinov2
from transformers import (
    Dinov2Config,
    Dinov2WithRegistersBackbone,
    Dinov2WithRegistersConfig,
    DPTConfig,
    DPTForDepthEstimation,
)

import tokenfuse

STAGES = ["stage1", "stage2", "stage3"]


def tiny_dpt() -> DPTForDepthEstimation:
    """DPT on a 3-layer DINOv2 backbone, as Depth Anything lays it out: every layer's tokens, [CLS]
    first, reassembled into maps of four scales."""
    torch.manual_seed(0)
    backbone = Dinov2Config(**VIT, mlp_ratio=2, out_features=STAGES, reshape_hidden_states=False)
    config = DPTConfig(
        backbone_config=backbone,
        hidden_size=32,
        neck_hidden_sizes=[8, 16, 32],
        fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1],
        head_in_index=-1,
        add_projection=False,
    )
    return DPTForDepthEstimation(config).eval()


def depth(model, pixels):
    with torch.inference_mode():
        return model(pixel_values=pixels).predicted_depth


@pytest.mark.parametrize("method", ["tome", "evit", "expedite"])
def test_dpt_on_a_dinov2_backbone_keeps_its_output_and_is_bit_identical_at_keep_one(method):
    model = tiny_dpt()
    pixels = images()
    full = depth(model, pixels)
    tokenfuse.apply(model.backbone, method, keep=1.0)
    assert torch.equal(depth(model, pixels), full)
    tokenfuse.apply(model.backbone, method, keep=0.5)
    reduced = depth(model, pixels)
    assert tokenfuse.last_tokens(model.backbone).size.shape[1] < 65  # the backbone did reduce
    assert reduced.shape == full.shape and torch.isfinite(reduced).all()
    assert torch.corrcoef(torch.stack([reduced.flatten(), full.flatten()]))[0, 1] > 0.5
    tokenfuse.remove(model.backbone)
    assert torch.equal(depth(model, pixels), full)


def test_a_backbone_with_registers_gives_feature_maps_of_the_grid():
    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(**VIT, mlp_ratio=2, num_register_tokens=2, out_features=STAGES)
    model = Dinov2WithRegistersBackbone(config).eval()
    pixels = images()
    with torch.inference_mode():
        full = model(pixel_values=pixels).feature_maps
    for keep in (1.0, 0.5):
        tokenfuse.apply(model, "expedite", keep=keep)
        with torch.inference_mode():
            maps = model(pixel_values=pixels).feature_maps
        assert all(m.shape == (3, 32, 8, 8) for m in maps)
        assert all(torch.equal(a, b) for a, b in zip(maps, full, strict=True)) == (keep == 1.0)
    assert tokenfuse.last_tokens(model).size.shape[1] < 67  # [CLS], 2 registers, 64 patches


@pytest.mark.parametrize("method", ["tome", "expedite"])
def test_every_requested_hidden_state_comes_back_at_full_resolution(method):
    model = tiny_dinov2()
    pixels = images()
    with torch.inference_mode():
        full = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    tokenfuse.apply(model, method, keep=1.0, track_source=True)
    with torch.inference_mode():
        same = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert all(torch.equal(a, b) for a, b in zip(same, full, strict=True))
    tokenfuse.apply(model, method, keep=0.5, track_source=True)
    with torch.inference_mode():
        out = model(pixel_values=pixels, output_hidden_states=True)
    assert out.last_hidden_state.shape[1] < 65
    assert [h.shape for h in out.hidden_states] == [h.shape for h in full]
    trace = tokenfuse.patch_of(model).layer_tokens()[:, 0]  # tokens entering each layer
    for layer, entering in enumerate(trace[:, 0].tolist()):  # a layer's input, whole or mapped back
        assert (entering == 65) == torch.equal(out.hidden_states[layer], full[layer])
