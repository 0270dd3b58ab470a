"""`tokenfuse bench --task long` on a tiny ModernBERT configuration (conftest.tiny_modernbert: 4 layers,
2 of them local with a window of 8, 128 positions), lengths 64 and 128: every length gets the full
model, ToMe and truncation, truncation runs half the tokens, ToMe at keep 1.0 is the full model, the
FLOPs fall toward attention's limit with length, and bad lengths are refused before any work. No
timing is asserted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_modernbert
from transformers import ModernBertModel

from tokenfuse import cli
from tokenfuse.eval import bench_long, runtime
from tokenfuse.eval.measure import FULL, Config

LENGTHS = (64, 128)


@pytest.fixture
def tiny(monkeypatch):
    """The bench on a tiny ModernBERT; `built` records every model the bench builds."""
    config = tiny_modernbert().config
    built = []
    build = runtime.random_model
    monkeypatch.setattr(bench_long, "modernbert_base", lambda: config)
    monkeypatch.setattr(runtime, "random_model", lambda *a: built.append(a) or build(*a))
    return config, built


@pytest.fixture(scope="module")
def sweep():
    """The sweep at lengths 64 and 128, one round, with its progress bar."""
    return bench_long.run(lengths=LENGTHS, repeats=1, config=tiny_modernbert().config, progress=True)


def test_every_length_has_the_full_model_tome_and_truncation(sweep):
    rows = sweep["rows"]
    assert [(r["length"], r["method"], r["keep"]) for r in rows] == [
        (n, m, k) for n in LENGTHS for m, k in (("full", 1.0), ("tome", 0.5), ("truncation", 0.5))
    ]
    for row in rows:
        assert {"length", "batch", "runs", "tokens", "flops", "speedup", "scoring", "overhead"} <= set(row)
        assert row["batch"] == 2048 // row["length"] and row["runs"] == 1
        assert not {"cosine", "accuracy"} & set(row)  # no quality from random weights
    args = sweep["meta"]["arguments"]
    assert args["weights"] == "random" and args["attention"] == "sdpa" and args["lengths"] == [64, 128]


def test_the_table_says_the_weights_are_random_and_what_the_flops_count(tiny, tmp_path, capsys):
    out = tmp_path / "long.json"
    argv = ["bench", "--task", "long", "--lengths", "128,64", "--repeats", "1", "--no-progress"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "RANDOM weights, only speed is measured" in printed
    assert "4 layers (2 global, 2 local with a window of 8 tokens)" in printed
    assert "sdpa computes local layers (full attention under a window mask)" in printed
    assert [r["length"] for r in json.loads(out.read_text())["rows"]] == [64] * 3 + [128] * 3


def test_truncation_runs_the_first_half_of_every_sequence():
    model = runtime.random_model(ModernBertModel, tiny_modernbert().config, "float32")
    ids = bench_long.random_tokens(model.config, 3, 64)
    seen = []
    model.embeddings.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"]), with_kwargs=True
    )
    task = bench_long.LongTask(model, ids)
    task.run(Config("truncation", 0.5))
    (short,) = seen
    assert short.shape == (3, 32)
    assert torch.equal(short[:, :31], ids[:, :31]) and (short[:, -1] == model.config.sep_token_id).all()
    assert (ids[:, 0] == model.config.cls_token_id).all()
    assert not np.isin(ids[:, 1:-1], [0, 101, 102]).any()  # no special token inside a sequence


def test_tome_at_keep_1_is_the_full_model():
    model = runtime.random_model(ModernBertModel, tiny_modernbert().config, "float32")
    task = bench_long.LongTask(model, bench_long.random_tokens(model.config, 2, 128))
    full, tome = task.run(FULL), task.run(Config("tome", 1.0))
    assert np.array_equal(full.outputs["embedding"], tome.outputs["embedding"])
    assert np.array_equal(full.layer_tokens, tome.layer_tokens)


def test_flops_fall_toward_attentions_limit_with_length(sweep):
    """Linear layers' work falls as the tokens, attention's as their square: a reduction's FLOPs
    ratio lies between its tokens squared and its tokens, and nears the square as length grows."""
    flops = {(r["method"], r["length"]): r for r in sweep["rows"]}
    for method in ("tome", "truncation"):
        for n in LENGTHS:
            row = flops[method, n]
            assert 0 < row["tokens"] ** 2 <= row["flops"] <= row["tokens"] <= 1
        assert flops[method, 128]["flops"] < flops[method, 64]["flops"]
    # truncation by hand: 4 layers, hidden 32, gated MLP 2 x 64 wide; per token, per layer
    linear, pairs = 2 * (4 * 32 * 32 + 3 * 32 * 64), 2 * 2 * 32  # x n, x n^2
    for n in LENGTHS:
        half = n // 2
        expected = (linear * half + pairs * half**2) / (linear * n + pairs * n**2)
        assert flops["truncation", n]["flops"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("lengths", "message"),
    [
        (
            "32,128",
            "--lengths 32,128: each length must be from 64 (shorter texts are the text bench's, --task text)",
        ),
        ("256", "to 128 (the model's max_position_embeddings); give e.g. --lengths 64,128"),
    ],
)
def test_a_length_out_of_range_is_refused_before_any_work(tiny, capsys, lengths, message):
    config, built = tiny
    assert cli.main(["bench", "--task", "long", "--lengths", lengths]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert built == []


def test_a_length_that_is_not_a_whole_number_is_refused_by_the_parser(tiny, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["bench", "--task", "long", "--lengths", "128,1.5"])
    assert exited.value.code == 2
    assert (
        "argument --lengths: expected comma-separated whole numbers, got '128,1.5'" in capsys.readouterr().err
    )
    assert tiny[1] == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "long", "--limit", "4"], "the long bench times one batch per length: drop --limit"),
        (
            ["--task", "long", "--model", "x"],
            "ModernBERT-base's configuration with random weights: drop --model",
        ),
        (["--task", "long", "--runtime", "int8"], "--runtime is an option of the text bench"),
        (["--lengths", "128"], "--lengths is an option of --task long: drop it"),
    ],
)
def test_options_of_other_benches_are_refused(tiny, capsys, argv, message):
    assert cli.main(["bench", *argv]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert tiny[1] == []


def test_long_lengths_run_fewer_rounds_and_batches_hold_2048_tokens():
    assert [bench_long.rounds(3, n) for n in bench_long.LENGTHS] == [3, 3, 3, 3, 3, 2, 1]
    assert [bench_long.default_batch(n) for n in bench_long.LENGTHS] == [16, 8, 4, 2, 1, 1, 1]


def test_the_base_configuration_is_modernbert_base():
    """ModernBERT-base: 149 M parameters (its model card), 22 layers, global every third; built on
    the meta device, no memory used."""
    config = bench_long.modernbert_base()
    with torch.device("meta"):
        model = ModernBertModel(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(149e6, rel=0.005)
    assert [i for i, k in enumerate(config.layer_types) if k == "full_attention"] == list(range(0, 22, 3))
    assert (config.hidden_size, config.local_attention, config.max_position_embeddings) == (768, 128, 8192)
    assert model.config._attn_implementation == "sdpa"
