"""tokenfuse.embed: ordering, pooling, bad input."""

import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_bert

import tokenfuse
from tokenfuse.api.text import tokenize


def test_rows_come_back_in_input_order(tokenizer, texts):
    model = tiny_bert()
    together = tokenfuse.embed(model, tokenizer, texts, batch_size=2)
    for i, text in enumerate(texts):
        assert torch.allclose(tokenfuse.embed(model, tokenizer, [text])[0], together[i], atol=1e-5)


def test_unreduced_embedding_is_the_models_masked_mean(tokenizer, texts):
    model = tiny_bert()
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"][..., None].float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    assert torch.allclose(tokenfuse.embed(model, tokenizer, texts), expected, atol=1e-5)
    cls = tokenfuse.embed(model, tokenizer, texts, pooling="cls")
    assert torch.allclose(cls, hidden[:, 0], atol=1e-5)


def test_empty_and_non_text_input_is_refused(tokenizer):
    model = tiny_bert()
    with pytest.raises(ValueError, match="text 1 is empty"):
        tokenfuse.embed(model, tokenizer, ["fine", "  "])
    with pytest.raises(TypeError, match="text 0 is a int"):
        tokenfuse.embed(model, tokenizer, [3])
    with pytest.raises(ValueError, match="no texts"):
        tokenfuse.embed(model, tokenizer, [])
    with pytest.raises(ValueError, match="pooling must be one of"):
        tokenfuse.embed(model, tokenizer, ["fine"], pooling="weightedmean")


@pytest.mark.parametrize(
    ("arguments", "error", "expected"),
    [
        ({"max_length": 0}, ValueError, "max_length 0 leaves no room for text: .* adds 2 special tokens"),
        ({"max_length": -5}, ValueError, "max_length -5 leaves no room"),
        ({"max_length": 2}, ValueError, "max_length 2 leaves no room .* give at least 3"),
        ({"max_length": 12.5}, TypeError, "max_length must be an int"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive int, got 0"),
        ({"batch_size": -1}, ValueError, "batch_size must be a positive int, got -1"),
        ({"batch_size": 2.0}, ValueError, "batch_size must be a positive int, got 2.0"),
    ],
)
def test_sizes_that_cannot_work_are_refused(tokenizer, texts, arguments, error, expected):
    with pytest.raises(error, match=expected):
        tokenfuse.embed(tiny_bert(), tokenizer, texts, **arguments)


def test_the_shortest_max_length_keeps_one_token_of_text(tokenizer, texts):
    with pytest.warns(UserWarning, match="5 of 5 texts are longer than 3 tokens"):
        out = tokenfuse.embed(tiny_bert(), tokenizer, texts, max_length=3)
    assert out.shape == (5, 32) and torch.isfinite(out).all()


def test_any_iterable_of_str_is_embedded_like_a_list(tokenizer, texts):
    model = tiny_bert()
    expected = tokenfuse.embed(model, tokenizer, texts)
    assert torch.equal(tokenfuse.embed(model, tokenizer, (t for t in texts)), expected)
    assert torch.equal(tokenfuse.embed(model, tokenizer, np.array(texts)), expected)
    assert torch.allclose(
        tokenfuse.embed(model, tokenizer, texts[1]), expected[1:2], atol=1e-5
    )  # alone: no padding
    with pytest.raises(TypeError, match="texts are bytes; decode them"):
        tokenfuse.embed(model, tokenizer, texts[1].encode())
    with pytest.raises(TypeError, match="texts must be a str or an iterable of str, got int"):
        tokenfuse.embed(model, tokenizer, 3)
    with pytest.raises(TypeError, match="text 0 is a ndarray"):
        tokenfuse.embed(model, tokenizer, np.array([["a", "b"], ["c", "d"]]))


def test_too_long_text_is_truncated_with_a_warning(tokenizer):
    model = tiny_bert()  # 64 positions
    long_text = "word " * 300
    with pytest.warns(UserWarning, match="1 of 2 texts are longer than 64 tokens"):
        out = tokenfuse.embed(model, tokenizer, [long_text, "short"])
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    with pytest.warns(UserWarning, match="exceeds the model's maximum 64"):
        tokenfuse.embed(model, tokenizer, ["short"], max_length=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenfuse.embed(model, tokenizer, ["short"], max_length=64)


def test_prefix_feeds_the_first_tokens_and_keeps_special_tokens(tokenizer):
    full = tokenize(tokenizer, ["one two three four five six seven eight"], 64)[0]
    half = tokenize(tokenizer, ["one two three four five six seven eight"], 64, prefix=0.5)[0]
    assert len(half) == round(0.5 * len(full))
    assert half[0] == full[0] and half[-1] == full[-1]  # [CLS] ... [SEP]
    assert half[1:-1] == full[1 : len(half) - 1]


def test_embed_works_on_a_reduced_model_with_progress(tokenizer, texts):
    model = tokenfuse.apply(tiny_bert(), "tome", keep=0.5)
    out = tokenfuse.embed(model, tokenizer, texts * 3, batch_size=2, progress=True)
    alone = torch.stack([tokenfuse.embed(model, tokenizer, [text])[0] for text in texts])
    assert out.shape == (15, 32) and torch.allclose(out, alone.repeat(3, 1), atol=1e-5)  # batches, padding
    full = tokenfuse.embed(tiny_bert(), tokenizer, texts)
    assert ((out[:5] - full).norm(dim=1) > 0.1).all()  # reduced, not the full model
