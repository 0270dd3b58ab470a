"""The length floor (`Method.min_tokens`): no reduction point takes a sequence below it, so short
texts keep their tokens, each row of a batch on its own; text encoders have one by default."""

from __future__ import annotations

import pytest
import torch
from conftest import images, tiny_bert, tiny_vit

import tokenfuse
from tokenfuse.adapters.hf_text import MIN_TOKENS
from tokenfuse.core import pool_mean

pytestmark = pytest.mark.floor

LONG = (
    "Markets rallied on Tuesday as investors weighed new figures on inflation, jobs and the outlook "
    "for interest rates, while oil prices slipped for a third day and bond yields fell back."
)
SHORT = "A film about a film."


def embeddings(model, tokenizer, texts, side="right"):
    """(mean-pooled embeddings, tokens each layer processed (L, 2, B), real tokens per text) of one call."""
    inputs = tokenizer(texts, padding=True, padding_side=side, return_tensors="pt")
    inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)  # as alone
    with torch.inference_mode():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"]
    if tokenfuse.patch_of(model) is None:
        return pool_mean(hidden, mask), None, mask.sum(-1)
    patch = tokenfuse.patch_of(model)
    return pool_mean(hidden, tokenfuse.token_sizes(model)), patch.layer_tokens(), mask.sum(-1)


def test_a_text_shorter_than_the_default_floor_is_computed_as_by_the_unpatched_model(tokenizer):
    model = tiny_bert()
    full, _, n = embeddings(model, tokenizer, [SHORT])
    assert n.item() < MIN_TOKENS
    tokenfuse.apply(model, "tome", keep=0.5)
    reduced, layer_tokens, _ = embeddings(model, tokenizer, [SHORT])
    assert torch.equal(reduced, full)
    assert (layer_tokens == n).all()


def test_min_tokens_zero_turns_the_floor_off(tokenizer):
    model = tokenfuse.apply(tiny_bert(), "tome", keep=0.5, min_tokens=0)
    _, layer_tokens, n = embeddings(model, tokenizer, [SHORT])
    assert layer_tokens[-1, 1].item() < n.item()


@pytest.mark.parametrize("method", ["tome", "evit", "pool"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_no_row_goes_below_the_floor_and_each_row_reduces_as_alone(tokenizer, method, side):
    """A floor of 12 on texts of about 7, 14, 20 and 40 tokens at keep 0.35: rows shorter than it
    keep every token, longer ones stop at it, and each row is what it is alone."""
    texts = [SHORT, LONG, "Tokens that look alike can be merged; tokens alone should be kept.", LONG[:60]]
    model = tokenfuse.apply(tiny_bert(), method, keep=0.35, min_tokens=12)
    batch, layer_tokens, n = embeddings(model, tokenizer, texts, side)
    assert (layer_tokens >= n.clamp_max(12)).all()
    assert (layer_tokens[:, :, n <= 12] == n[n <= 12]).all()
    assert (layer_tokens[-1, 1, n > 24] < n[n > 24]).all()
    for i, text in enumerate(texts):
        alone, tokens_alone, _ = embeddings(model, tokenizer, [text])
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=0)
        assert torch.equal(tokens_alone[..., 0], layer_tokens[..., i])


def test_static_mode_keeps_the_floor_and_equals_the_default_mode(tokenizer):
    texts = [SHORT, LONG, LONG[:60]]
    dynamic, dynamic_tokens, _ = embeddings(
        tokenfuse.apply(tiny_bert(), "tome", keep=0.35, min_tokens=12), tokenizer, texts
    )
    static, static_tokens, _ = embeddings(
        tokenfuse.apply(tiny_bert(), "tome", keep=0.35, min_tokens=12, static=True), tokenizer, texts
    )
    torch.testing.assert_close(static, dynamic, atol=1e-6, rtol=0)
    assert torch.equal(static_tokens, dynamic_tokens)


def test_vision_models_have_no_default_floor_and_take_one_when_asked():
    pixels = images(2)
    model = tokenfuse.apply(tiny_vit(), "tome", keep=0.5)
    with torch.inference_mode():
        model(pixel_values=pixels)
    unfloored = tokenfuse.patch_of(model).layer_tokens()
    tokenfuse.apply(model, "tome", keep=0.5, min_tokens=40)
    with torch.inference_mode():
        model(pixel_values=pixels)
    floored = tokenfuse.patch_of(model).layer_tokens()
    assert unfloored.min() < 40 <= floored.min()


@pytest.mark.parametrize("value", [-1, 1.5, True, "32"])
def test_a_floor_that_is_no_count_of_tokens_is_refused(value):
    with pytest.raises(ValueError, match=r"min_tokens must be a whole number >= 0 or None \(.*\), got"):
        tokenfuse.apply(tiny_bert(), "tome", keep=0.5, min_tokens=value)


def test_the_floor_is_recorded_with_the_method():
    assert tokenfuse.patch_of(tokenfuse.apply(tiny_bert(), "tome", min_tokens=16)).min_tokens == 16
    assert tokenfuse.patch_of(tokenfuse.apply(tiny_bert(), "mctf")).min_tokens == MIN_TOKENS
    assert tokenfuse.methods.make("tome", min_tokens=16).options()["min_tokens"] == 16


@pytest.mark.integration
def test_short_bbc_paragraphs_keep_the_full_models_embedding_by_default():
    """The issue's bar: on BBC News paragraphs under 32 tokens the default configuration's mean
    cosine to the full model is at least 0.98 (without the floor it is about 0.75)."""
    from tokenfuse.assets.text import bbc_paragraphs, load_text_model

    model, tokenizer = load_text_model("minilm")
    texts = [p["text"] for p in bbc_paragraphs(60)]
    texts = [t for t in texts if len(tokenizer(t)["input_ids"]) < 32]
    assert len(texts) >= 50
    full = tokenfuse.embed(model, tokenizer, texts, progress=False)
    tokenfuse.apply(model, "tome", keep=0.5, min_tokens=0)
    unfloored = tokenfuse.embed(model, tokenizer, texts, progress=False)
    tokenfuse.apply(model, "tome", keep=0.5)
    floored = tokenfuse.embed(model, tokenizer, texts, progress=False)
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(floored, full).mean() >= 0.98 > cosine(unfloored, full).mean()
