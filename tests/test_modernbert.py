"""ModernBERT: rotary positions and sliding-window local layers, both of which must follow the
tokens' original positions once they are merged, pruned or laid out anew. On a tiny random
ModernBertModel (conftest.tiny_modernbert: local layers 1 and 3 reach 4 positions either side, fewer
than the test sentences hold) read through the MiniLM tokenizer."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import tiny_modernbert
from test_mpnet import MergeFirstAndFlip, expected_positions
from transformers import AutoTokenizer, ModernBertForMaskedLM, ModernBertForSequenceClassification
from transformers.models.modernbert import modeling_modernbert

import tokenfuse
from tokenfuse.assets import text as data
from tokenfuse.core import Reduction
from tokenfuse.methods import Method

SIDES = ("right", "left")
REACH = 4  # tiny_modernbert's config.sliding_window
METHODS = ("tome", "pitome")  # every method that reads no attention probabilities: test_contracts


@functools.cache
def side_tokenizer(side: str):
    return AutoTokenizer.from_pretrained(data.minilm_path(), local_files_only=True, padding_side=side)


def batch(side, texts):
    return side_tokenizer(side)(texts, padding=True, return_tensors="pt", return_token_type_ids=False)


def hidden(model, inputs):
    with torch.inference_mode():
        return model(**inputs).last_hidden_state


def layer_calls(model) -> dict:
    """Per layer, the keyword arguments its attention receives (mask and rotary angles)."""
    seen = {}
    for i, layer in enumerate(model.layers):
        layer.attn.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(i, kw), with_kwargs=True)
    return seen


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("method", METHODS)
def test_keep_one_is_bit_identical_on_both_padding_sides_and_remove_restores(method, side, attn, texts):
    model = tiny_modernbert(attn)
    inputs = batch(side, texts)
    before = hidden(model, inputs)
    tokenfuse.apply(model, method, keep=1.0)
    assert torch.equal(hidden(model, inputs), before)
    tokenfuse.apply(model, method, keep=0.5)
    assert hidden(model, inputs).shape[1] < before.shape[1]
    tokenfuse.remove(model)
    assert torch.equal(hidden(model, inputs), before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", METHODS)
def test_a_text_reduces_alone_as_in_a_batch_padded_either_side(method, attn, texts):
    """Left padding shifts every position of a text (ModernBERT counts positions from the first
    slot); rotary angles and windows depend on distances only, so the text must come out as alone."""
    model = tokenfuse.apply(tiny_modernbert(attn), method, keep=0.5)
    embedded = {s: tokenfuse.embed(model, side_tokenizer(s), texts, batch_size=len(texts)) for s in SIDES}
    assert torch.allclose(embedded["left"], embedded["right"], atol=1e-5)
    for side in SIDES:
        inputs = batch(side, texts)
        together = hidden(model, inputs)
        count = tokenfuse.last_tokens(model).count
        assert together.shape[1] < inputs["input_ids"].shape[1]
        for i, text in enumerate(texts):
            alone = hidden(model, batch("right", [text]))
            assert alone.shape[1] == count[i]
            assert torch.allclose(alone[0], together[i, : int(count[i])], atol=1e-5), (side, i)


def allowed(mask) -> torch.Tensor:
    """(B, N, N) which keys each query attends to, from a bool or additive mask (B, 1, N|1, N)."""
    mask = mask[:, 0]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_hosts_window_is_the_one_tokenfuse_rebuilds(attn, texts):
    """What the reduced local layers' masks rest on: the unreduced host lets a real query see the
    real keys within config.sliding_window slots either side (transformers 5.x)."""
    model = tiny_modernbert(attn)
    assert model.config.sliding_window == REACH and model.config.layer_types[1] == "sliding_attention"
    seen = layer_calls(model)
    inputs = batch("left", texts)
    hidden(model, inputs)
    real = inputs["attention_mask"].bool()
    N = real.shape[1]
    slots = torch.arange(N)
    near = (slots[:, None] - slots[None, :]).abs() <= REACH
    want = near & real[:, None, :]
    got = allowed(seen[1]["attention_mask"])
    assert torch.equal(got[real], want[real])


def test_the_window_and_angles_follow_the_original_positions_of_merged_and_moved_tokens(texts):
    """After each reduction the test device merges a token and reverses the order of the rest: slot
    distances then differ from position distances (a window taken from the slots fails), and each
    layer's angles must be the host's at the positions its tokens came from."""
    model = tiny_modernbert("eager")
    method = MergeFirstAndFlip(keep=0.5)
    tokenfuse.apply(model, method)
    seen = layer_calls(model)
    inputs = batch("left", texts)
    hidden(model, inputs)
    assert method.calls[0][0] == 0 and sum(any(acts) for _, acts in method.calls) >= 2
    mattered = False  # some reduced local layer holds tokens further apart than the window
    # a reduction point l + 1 runs after all of layer l: layer l holds what points up to l left
    for i, layer in enumerate(model.layers):
        kw = seen[i]
        for b, positions in enumerate(expected_positions(method, inputs, i)):
            M = len(positions)
            p = torch.tensor(positions)
            cos, sin = model.rotary_emb(torch.zeros(1), p[None], layer.attention_type)
            assert torch.equal(kw["position_embeddings"][0][b, :M], cos[0]), (i, b)
            assert torch.equal(kw["position_embeddings"][1][b, :M], sin[0]), (i, b)
            if i == 0 or layer.attention_type != "sliding_attention":
                continue
            near = (p[:, None] - p[None, :]).abs() <= REACH
            assert torch.equal(allowed(kw["attention_mask"])[b, :M, :M], near), (i, b)
            mattered |= not bool(near.all())
    assert mattered


class Interleave(Method):
    """A test device: removes nothing, and at the embeddings lays out the tokens between [CLS] and
    [SEP] at odd positions first, then even ones: a permutation that changes distances."""

    name = "interleave"
    paper = "none: a test device"

    def decide(self, inp):
        B, N = inp.tokens.size.shape
        position = torch.arange(N).expand(B, N)
        if inp.point > 0:
            return Reduction.hard(position)
        order = (position % 2 == 0) * N + position + N  # odd, then even
        order = torch.where(inp.tokens.protected, torch.where(position == 0, 0, 4 * N + position), order)
        return Reduction.hard(position, order=order)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tokens_laid_out_anew_compute_what_the_host_computes(attn, texts):
    """Attention is blind to the order of its tokens except through the rotary angles and the
    window: with the tokens interleaved at the embeddings and nothing removed, the reduction path
    must give the host's own output, interleaved alike."""
    model = tiny_modernbert(attn)
    for text in texts[::2]:
        inputs = batch("right", [text])
        want = hidden(model, inputs)[0]
        N = want.shape[0]
        assert N > 2 * REACH + 2  # longer than the window
        tokenfuse.apply(model, Interleave(keep=0.5, prop_attn=False, min_tokens=0))
        got = hidden(model, inputs)[0]
        assert tokenfuse.patch_of(model).decide_seconds > 0  # the path really ran
        tokenfuse.remove(model)
        middle = torch.arange(1, N - 1)
        order = torch.cat([middle[middle % 2 == 1], middle[middle % 2 == 0]])
        assert torch.allclose(got[1:-1], want[order], atol=1e-5), (got[1:-1] - want[order]).abs().max()
        assert torch.allclose(got[[0, -1]], want[[0, -1]], atol=1e-5)


class Recorder(Method):
    name = "recorder"
    paper = "none: a test device"
    needs = frozenset({"keys"})

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def decide(self, inp):
        self.seen.append(inp)
        B, N = inp.tokens.size.shape
        return Reduction.hard(torch.arange(N).expand(B, N))


def test_methods_read_the_queries_and_keys_the_layer_rotated(texts, monkeypatch):
    rotated = []
    host = modeling_modernbert.apply_rotary_pos_emb

    def spy(q, k, cos, sin, unsqueeze_dim=1):
        out = host(q, k, cos, sin, unsqueeze_dim)
        rotated.append(out)
        return out

    monkeypatch.setattr(modeling_modernbert, "apply_rotary_pos_emb", spy)
    model = tiny_modernbert("eager")
    recorder = Recorder(keep=0.5)
    tokenfuse.apply(model, recorder)
    hidden(model, batch("right", texts))
    after_layers = [inp for inp in recorder.seen if inp.point > 0]
    assert len(rotated) == 4 and [inp.point for inp in after_layers] == [1, 2, 3]  # none after the last
    for inp in after_layers:
        q, k = rotated[inp.point - 1]
        assert torch.equal(inp.q, q) and torch.equal(inp.k, k)


def test_the_trace_says_each_mlp_ran_on_the_tokens_that_entered_its_layer(texts):
    model = tokenfuse.apply(tiny_modernbert(), "tome", keep=0.5)
    out = hidden(model, batch("right", texts))
    layers = tokenfuse.patch_of(model).layer_tokens()  # (L, 2, B)
    assert torch.equal(layers[:, 0], layers[:, 1])
    assert torch.all(layers[1:, 0] <= layers[:-1, 0]) and torch.any(layers[-1, 0] < layers[0, 0])
    assert torch.equal(tokenfuse.last_tokens(model).count, layers[-1, 0])  # nothing after the last layer
    assert out.shape[1] == int(layers[-1, 0].max())


@pytest.mark.parametrize("method", ["evit", "ats", "zero-tprune", "mctf"])
def test_methods_that_read_attention_are_refused_with_the_reason(method):
    model = tiny_modernbert()
    with pytest.raises(
        ValueError, match=r"local layers attend within 4 positions.*choose a method that reads keys"
    ):
        tokenfuse.apply(model, method, keep=0.5)
    assert tokenfuse.patch_of(model) is None


def test_a_first_layer_of_local_attention_is_refused():
    model = tiny_modernbert(layer_types=["sliding_attention", "full_attention"] * 2)
    with pytest.raises(ValueError, match=r"first layer attends within a window.*layer_types starting with"):
        tokenfuse.apply(model, "tome", keep=0.5)


def test_a_cls_classifier_is_reduced_and_a_mean_one_and_a_masked_lm_refused(texts):
    config = tiny_modernbert().config
    inputs = batch("right", texts)
    torch.manual_seed(0)
    model = ModernBertForSequenceClassification(config).eval()
    with torch.inference_mode():
        before = model(**inputs).logits
        same = tokenfuse.apply(model, "tome", keep=1.0)(**inputs).logits
        reduced = tokenfuse.apply(model, "tome", keep=0.5)(**inputs).logits
    assert torch.equal(before, same) and reduced.shape == before.shape and not torch.equal(reduced, before)
    config.classifier_pooling = "mean"
    with pytest.raises(ValueError, match=r"classifier_pooling='mean'.*classifier_pooling='cls'"):
        tokenfuse.apply(ModernBertForSequenceClassification(config), "tome", keep=0.5)
    with pytest.raises(TypeError, match="ModernBertForMaskedLM returns one output per input token"):
        tokenfuse.apply(ModernBertForMaskedLM(config), "tome", keep=0.5)
