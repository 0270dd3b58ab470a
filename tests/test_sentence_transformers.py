"""SentenceTransformer models: `encode` pools the reduced tokens through sentence-transformers' own
Pooling as `tokenfuse.embed` pools them, keep 1.0 and `remove` are bit-identical to the unpatched
model, and what cannot be reproduced on merged tokens is refused. A tiny random BERT saved to a
folder, loaded as sentence-transformers modules, offline."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from conftest import tiny_bert
from test_adapter_state import in_threads
from transformers import GPT2Config, GPT2Model

import tokenfuse
from tokenfuse.assets import text as data
from tokenfuse.cli import main

st = pytest.importorskip("sentence_transformers", reason="pip install 'tokenfuse[st]'")
try:  # sentence-transformers >= 6
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
except ImportError:
    from sentence_transformers.models import Normalize, Pooling, Transformer

MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens", ("cls", "mean"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    """A tiny random BERT with the packaged MiniLM tokenizer, as a transformers model folder."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def sentence_model(folder: str, mode="mean", normalize: bool = False, **pooling):
    modules = [Transformer(folder), Pooling(32, mode, **pooling), *([Normalize()] if normalize else [])]
    model = st.SentenceTransformer(modules=modules, device="cpu").eval()
    model.max_seq_length = 64
    return model


def encode(model, texts, **kwargs) -> torch.Tensor:
    return model.encode(texts, batch_size=len(texts), convert_to_tensor=True, **kwargs)


def embedded(model, tokenizer, texts, mode, normalize: bool) -> torch.Tensor:
    """tokenfuse.embed on the encoder inside: each mode pooled with the patch's token sizes, in
    sentence-transformers' order, normalized where the model has a Normalize module."""
    modes = (mode,) if isinstance(mode, str) else mode
    inner = model[0].auto_model
    out = torch.cat([tokenfuse.embed(inner, tokenizer, texts, len(texts), pooling=m) for m in modes], -1)
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_encode_pools_the_reduced_tokens_as_embed_does(folder, tokenizer, texts, mode, normalize):
    model = sentence_model(folder, mode, normalize)
    full = encode(model, texts)
    assert tokenfuse.apply(model, "tome", keep=1.0) is model
    assert torch.equal(encode(model, texts), full)
    tokenfuse.apply(model, "tome", keep=0.5)
    reduced = encode(model, texts)
    assert bool((tokenfuse.token_sizes(model) > 1).any())  # tokens were merged
    assert torch.allclose(reduced, embedded(model, tokenizer, texts, mode, normalize), rtol=0, atol=1e-5)
    assert not torch.allclose(reduced, full, atol=1e-3)
    tokenfuse.remove(model)
    assert tokenfuse.patch_of(model) is None and tokenfuse.patch_of(model[0].auto_model) is None
    assert torch.equal(encode(model, texts), full)


def test_fractional_sizes_are_pooled_as_they_are(folder, tokenizer, texts):
    """Token Transforming spreads a token over several: sizes are not whole, and must not be rounded
    to the mask's integer type."""
    model = tokenfuse.apply(sentence_model(folder), "transforming", keep=0.5)
    reduced = encode(model, texts)
    sizes = tokenfuse.token_sizes(model)
    assert not torch.equal(sizes, sizes.round())
    assert torch.allclose(reduced, embedded(model, tokenizer, texts, "mean", False), rtol=0, atol=1e-5)


def test_one_patch_object_reads_the_encoders(folder, texts):
    model = tokenfuse.apply(sentence_model(folder), "tome", keep=0.5)
    inner = model[0].auto_model
    patch, encoder = tokenfuse.patch_of(model), tokenfuse.patch_of(inner)
    assert patch.encoder is encoder and patch.method is encoder.method
    encode(model, texts)
    assert torch.equal(tokenfuse.token_sizes(model), tokenfuse.token_sizes(inner))
    assert patch.decide_seconds == encoder.decide_seconds > 0
    assert torch.equal(patch.layer_tokens(), encoder.layer_tokens())


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_applying_again_replaces_and_remove_leaves_no_hook(folder, texts):
    model = sentence_model(folder)
    bare = hook_count(model)
    tokenfuse.apply(model, "random", keep=0.5)
    patched = hook_count(model)
    tokenfuse.apply(model, "tome", keep=0.5)
    assert hook_count(model) == patched > bare
    assert tokenfuse.patch_of(model).method.name == "tome"
    tokenfuse.remove(model)
    assert hook_count(model) == bare


def test_the_transformer_modules_hooks_count_in_the_encoders_overhead(folder, texts):
    model = sentence_model(folder)
    bare = hook_count(model)
    tokenfuse.apply(model, "tome", keep=0.5)
    encoder = tokenfuse.patch_of(model).encoder
    transformer = model[0]
    ours = [*transformer._forward_pre_hooks.values(), *transformer._forward_hooks.values()]
    assert hook_count(model) > bare and len(ours) == 2
    assert all(h.func == encoder._timer(None).func for h in ours)  # the encoder's own timer
    before = encoder.overhead_seconds
    encode(model, texts)
    assert tokenfuse.patch_of(model).overhead_seconds == encoder.overhead_seconds > before


@pytest.mark.parametrize("mode", ["lasttoken", "weightedmean", ("mean", "lasttoken")])
def test_positional_pooling_is_refused_before_anything_is_patched(folder, mode):
    model = sentence_model(folder, mode)
    with pytest.raises(ValueError, match="merged tokens have no position.*tokenfuse.embed"):
        tokenfuse.apply(model, "tome", keep=0.5)
    assert tokenfuse.patch_of(model) is None and tokenfuse.patch_of(model[0].auto_model) is None
    assert hook_count(model) == hook_count(sentence_model(folder, mode))


def test_a_module_other_than_pooling_after_the_transformer_is_refused(folder):
    model = st.SentenceTransformer(modules=[Transformer(folder), Normalize()], device="cpu")
    with pytest.raises(ValueError, match="second module is Normalize, not a Pooling"):
        tokenfuse.apply(model, "tome")
    assert tokenfuse.patch_of(model[0].auto_model) is None


def test_a_first_module_that_is_no_transformer_of_a_supported_encoder_is_refused(folder):
    model = sentence_model(folder)
    model[0].model = GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
    with pytest.raises(TypeError, match="wraps a 'gpt2' model; tokenfuse supports bert, roberta"):
        tokenfuse.apply(model, "tome")
    with pytest.raises(TypeError, match="first module is a sentence-transformers Transformer.*Pooling"):
        tokenfuse.apply(st.SentenceTransformer(modules=[Pooling(32)], device="cpu"), "tome")


def test_a_prompt_left_out_of_pooling_is_refused_when_given(folder, texts):
    model = sentence_model(folder, include_prompt=False)
    tokenfuse.apply(model, "tome", keep=0.5)
    encode(model, texts)  # no prompt: nothing to leave out
    with pytest.raises(ValueError, match="include_prompt=False.*encode without a prompt"):
        encode(model, texts, prompt="query: ")


def test_a_prompt_included_in_pooling_is_pooled_like_the_text(folder, tokenizer, texts):
    model = tokenfuse.apply(sentence_model(folder), "tome", keep=0.5)
    prompted = [f"query: {t}" for t in texts]
    expected = embedded(model, tokenizer, prompted, "mean", normalize=False)
    assert torch.allclose(encode(model, texts, prompt="query: "), expected, rtol=0, atol=1e-5)


def test_an_encoder_patch_removed_on_its_own_is_reported(folder, texts):
    model = tokenfuse.apply(sentence_model(folder), "tome", keep=0.5)
    encode(model, texts)
    tokenfuse.remove(model[0].auto_model)
    with pytest.raises(RuntimeError, match="without its tokenfuse patch.*apply the method to the Sentence"):
        encode(model, texts)
    tokenfuse.apply(model, "tome", keep=0.5)
    encode(model, texts)


def test_concurrent_encode_calls_equal_the_same_calls_one_by_one(folder, texts):
    model = tokenfuse.apply(sentence_model(folder, ("cls", "mean"), normalize=True), "tome", keep=0.5)
    groups = [texts[:2], texts[1:], texts[2:4], texts[::2]]
    alone = [(encode(model, g),) for g in groups]
    results, errors = in_threads([lambda g=g: (encode(model, g),) for g in groups])
    assert not errors, errors
    for expected, runs in zip(alone, results, strict=True):
        for (got,) in runs:
            assert torch.allclose(got, expected[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_reduces_on_its_own_and_removes_on_its_own(folder, texts, how):
    original = tokenfuse.apply(sentence_model(folder, ("cls", "mean")), "tome", keep=0.5)
    expected = encode(original, texts)
    clone = copy.deepcopy(original) if how == "deepcopy" else pickle.loads(pickle.dumps(original))
    patch = tokenfuse.patch_of(clone)
    assert patch is not tokenfuse.patch_of(original) and patch.model is clone
    assert (
        patch.encoder is tokenfuse.patch_of(clone[0].auto_model)
        and patch.encoder.model is clone[0].auto_model
    )
    assert torch.equal(encode(clone, texts), expected)
    tokenfuse.remove(clone)
    assert not torch.allclose(encode(clone, texts), expected, atol=1e-3)
    assert torch.equal(encode(original, texts), expected)  # the original still reduces


@pytest.fixture(scope="module")
def minilm_st():
    """The packaged all-MiniLM-L6-v2 as its own SentenceTransformer (Transformer, mean Pooling,
    Normalize; max_seq_length 256 from its folder), offline."""
    return st.SentenceTransformer(str(data.minilm_path()), device="cpu", local_files_only=True)


@pytest.mark.integration
def test_minilm_encode_is_identical_at_keep_one_and_equals_embed_at_half(minilm_st):
    """embed matched to encode: the same max length (the model's 256) and batch size (encode's 32)."""
    docs = data.bbc_news(64).texts
    full = minilm_st.encode(docs[:16], convert_to_tensor=True)
    tokenfuse.apply(minilm_st, "tome", keep=1.0)
    assert torch.equal(minilm_st.encode(docs[:16], convert_to_tensor=True), full)
    tokenfuse.apply(minilm_st, "tome", keep=0.5)
    try:
        reduced = minilm_st.encode(docs, batch_size=32, convert_to_tensor=True)
        inner = minilm_st[0].auto_model
        with pytest.warns(UserWarning, match="truncated"):
            embedded = tokenfuse.embed(inner, minilm_st.tokenizer, docs, batch_size=32, max_length=256)
    finally:
        tokenfuse.remove(minilm_st)
    assert minilm_st.max_seq_length == 256
    assert torch.allclose(reduced, torch.nn.functional.normalize(embedded, dim=-1), rtol=0, atol=1e-5)
    assert float(torch.nn.functional.cosine_similarity(reduced[:16], full).min()) < 0.999  # it reduced
    assert torch.equal(minilm_st.encode(docs[:16], convert_to_tensor=True), full)


@pytest.mark.integration
def test_the_st_bench_times_encode_and_embed_in_one_run(tmp_path):
    out = tmp_path / "st.json"
    argv = "bench --task st --limit 6 --batch-size 3 --max-length 96 --repeats 1 --no-progress --json"
    assert main([*argv.split(), str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["meta"]["arguments"]["task"] == "st"
    full, tome = results["rows"]
    assert (full["method"], tome["method"], tome["keep"]) == ("full", "tome", 0.5)
    for row in (full, tome):
        assert {"speedup", "encode_speedup", "encode_ratio", "tokens", "cosine"} <= set(row)
        assert row["encode_ratio"] == pytest.approx(row["encode_speedup"] / row["speedup"])
        assert row["encode_max_diff"] <= 1e-5 and row["encode_min_cosine"] >= 1 - 1e-5
    assert tome["tokens"] < 0.75 and tome["cosine"] < 0.9999


def test_the_st_bench_refuses_another_model_or_data_before_loading(capsys):
    assert main(["bench", "--task", "st", "--model", "other"]) == 2
    assert "packaged MiniLM on BBC News" in capsys.readouterr().err
