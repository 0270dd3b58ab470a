"""Static mode (`static=True`): every reduced batch laid out at a width known from its padded length
alone, nothing read back from the tensors, so that torch.compile traces a reduced model whole. Each
sequence is reduced as without it: results equal the default mode's, up to padding columns."""

import math

import pytest
import torch
from conftest import tiny_bert, tiny_mpnet

import tokenfuse
from tokenfuse.core import Reduction, Tokens, reduce


def encode(model, tokenizer, texts, side="right"):
    tokenizer.padding_side = side
    try:
        batch = tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    with torch.inference_mode():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    patch = tokenfuse.patch_of(model)
    size = batch["attention_mask"] if patch is None else patch.tokens.size
    return tokenfuse.pool_mean(hidden, size), size, batch["input_ids"].shape[1]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("make", [tiny_bert, tiny_mpnet])
def test_static_mode_reduces_each_sequence_as_the_default_mode(tokenizer, texts, side, make):
    """Same embeddings and token sizes per sequence as the default mode (either padding side, with
    MPNet's position bias following the tokens); the width is ceil(padded length * the last
    fraction) plus the two protected tokens, whatever the sequences' own lengths."""
    model = make()
    tokenfuse.apply(model, "tome", keep=0.5)
    dynamic, dynamic_size, _ = encode(model, tokenizer, texts, side)
    tokenfuse.apply(model, "tome", keep=0.5, static=True)
    static, static_size, n = encode(model, tokenizer, texts, side)
    patch = tokenfuse.patch_of(model)
    assert static_size.shape[1] == math.ceil(n * patch.schedule[-1]) + 2 >= dynamic_size.shape[1]
    torch.testing.assert_close(static, dynamic, atol=1e-6, rtol=0)
    kept = static_size.shape[1] - dynamic_size.shape[1]
    torch.testing.assert_close(static_size, torch.nn.functional.pad(dynamic_size, (0, kept)))


def test_static_mode_is_padding_invariant(tokenizer, texts):
    """A sequence alone and in a padded batch of longer ones: the same embedding."""
    model = tokenfuse.apply(tiny_bert(), "tome", keep=0.5, static=True)
    batch, _, _ = encode(model, tokenizer, texts)
    for i, text in enumerate(texts):
        alone, _, _ = encode(model, tokenizer, [text])
        torch.testing.assert_close(alone[0], batch[i], atol=1e-5, rtol=0)


def test_static_mode_at_keep_1_is_the_unpatched_model(tokenizer, texts):
    model = tiny_bert()
    base, _, _ = encode(model, tokenizer, texts, "left")
    tokenfuse.apply(model, "tome", keep=1.0, static=True)
    same, _, _ = encode(model, tokenizer, texts, "left")
    assert torch.equal(same, base)


def test_a_width_too_small_for_the_survivors_fails_instead_of_dropping_them():
    """A method that removes fewer tokens than its schedule asks would overflow the static width:
    the device-side check stops it (nothing is silently cut)."""
    tokens = Tokens.start(torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool))
    keep_all = Reduction.hard(torch.arange(4)[None])
    x = torch.randn(1, 4, 3)
    out, _ = reduce(x, tokens, keep_all, width=4)
    assert torch.equal(out, x)
    with pytest.raises(RuntimeError, match="static mode: a sequence kept more tokens"):
        reduce(x, tokens, keep_all, width=3)


def test_what_static_mode_cannot_lay_out_in_advance_is_refused():
    with pytest.raises(ValueError, match="ats removes a number of tokens that depends on each input"):
        tokenfuse.apply(tiny_bert(), "ats", keep=0.5, static=True)
    with pytest.raises(ValueError, match="static=True lays batches out by widths known in advance"):
        tokenfuse.apply(tiny_bert(), "tome", keep=0.5, static=True, protect_ids=[1010])


@pytest.mark.slow
def test_static_mode_compiles_to_one_graph_without_breaks(tokenizer, texts):
    """torch.compile of a reduced model in static mode: no graph break anywhere in the model (the
    default mode breaks at every value it reads back), batches of other lengths, odd and even at
    every reduction point, reuse the dynamic graph, and the compiled model gives what the eager one
    gives."""
    from torch._dynamo.utils import counters

    model = tokenfuse.apply(tiny_bert(layers=2), "tome", keep=0.5, static=True)
    compiled = torch.compile(model, dynamic=True)
    torch._dynamo.reset()
    counters.clear()
    schedule = tokenfuse.patch_of(model).schedule
    widths = []  # what each reduction point's decision sees
    for batch in (texts, texts[:2], texts[1:4], *[[" ".join(["a"] * (n - 2))] for n in (12, 15, 17)]):
        out, size, n = encode(compiled, tokenizer, batch)  # first: the sizes read are its own
        widths.append([n] + [min(n, math.ceil(n * f) + 2) for f in schedule if f < 1][:-1])
        eager, eager_size, _ = encode(model, tokenizer, batch)
        torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
        assert torch.equal(size, eager_size)
    assert len({tuple(w % 2 for w in ws) for ws in widths}) > 2, widths  # parities that differ
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] <= 2  # the first shape, then one dynamic graph


def test_export_refuses_the_default_mode_and_a_missing_folder(tmp_path):
    """What cannot be exported fails before the export starts (the export itself: test_runtimes)."""
    model = tokenfuse.apply(tiny_bert(), "tome", keep=0.5)
    with pytest.raises(ValueError, match="reduced in the default mode.*apply the method with static=True"):
        tokenfuse.export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="does not exist; create it first"):
        tokenfuse.export_onnx(model, tmp_path / "no" / "m.onnx")
