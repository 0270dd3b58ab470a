"""`tokenfuse bench --task vlm-speed` on a tiny Qwen2-VL configuration: every operator and keep gets a
row, the table says the weights are random and only speed is measured, bad sizes are refused before
any work; and the 2B configuration written out has the published model's shapes. No timing is
asserted."""

from __future__ import annotations

import json

import pytest
import torch
from test_qwen_vl import tiny_qwen
from transformers import Qwen2VLForConditionalGeneration

from tokenfuse import cli
from tokenfuse.eval import bench_vlm_speed


@pytest.fixture
def tiny(monkeypatch):
    """The bench on a tiny Qwen2-VL (patches of 4 px merged 2 x 2: images in cells of 8 px)."""
    config = tiny_qwen("qwen2-vl").config
    monkeypatch.setattr(bench_vlm_speed, "qwen2_vl_2b", lambda: config)
    return config


def test_the_table_has_every_row_and_says_the_weights_are_random(tiny, tmp_path, capsys):
    out = tmp_path / "speed.json"
    argv = ["bench", "--task", "vlm-speed", "--image-size", "32", "--repeats", "1", "--no-progress"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "RANDOM weights, only speed is measured" in printed
    assert "one 32x32 image (64 patches in the tower, 16 visual tokens)" in printed
    results = json.loads(out.read_text())
    assert results["meta"]["arguments"]["weights"] == "random"
    operators = bench_vlm_speed.METHODS.split(",")
    expected = [("full", 1.0)] + [(m, k) for k in bench_vlm_speed.KEEPS for m in operators]
    assert [(r["method"], r["keep"]) for r in results["rows"]] == expected
    for row in results["rows"]:
        assert {"speedup", "visual", "tokens", "flops"} <= set(row)
        assert not {"answer_acc", "agreement", "kl"} & set(row)  # no quality from random weights
    visual = {(r["method"], r["keep"]): r["visual"] for r in results["rows"]}
    assert visual["full", 1.0] == 1.0
    assert visual["divprune", 0.25] == pytest.approx(4 / 16)  # ceil(0.25 x 16) in every LLM layer
    assert 4 / 16 < visual["fastv", 0.25] < 1.0  # layers 0 and 1 see every visual token


def test_an_image_size_off_the_models_cells_is_refused_before_any_work(tiny, capsys):
    assert cli.main(["bench", "--task", "vlm-speed", "--image-size", "36"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cells of 8 px" in err and "give a multiple of 8, e.g. 32" in err


def test_the_2b_configuration_has_the_published_shapes():
    """Qwen2-VL-2B has 2.21 B parameters (its model card); built on the meta device, no memory used."""
    config = bench_vlm_speed.qwen2_vl_2b()
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(2.21e9, rel=0.005)
    assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert len(model.model.language_model.layers) == 28 and len(model.model.visual.blocks) == 32
