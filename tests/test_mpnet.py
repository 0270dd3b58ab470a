"""MPNet (all-mpnet-base-v2's architecture): a relative position bias, computed once by the encoder
for the unreduced input and handed to every layer, which must follow the tokens' original positions
once they are merged, pruned or laid out anew. On a tiny random MPNetModel; the MiniLM tokenizer
pads with [unused0], id 1, MPNet's fixed padding index (its position ids count from the ids, as
RoBERTa's do), so that a left-padded sequence gets the positions it has alone."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import tiny_mpnet
from test_adapter_state import SlowToMe, assert_runs_match, in_threads
from transformers import (
    AutoTokenizer,
    MPNetForMaskedLM,
    MPNetForSequenceClassification,
)

import tokenfuse
from tokenfuse.adapters.hf_text import host_position_bias
from tokenfuse.assets import text as data
from tokenfuse.core import Reduction, pool_mean
from tokenfuse.methods import Method

SIDES = ("right", "left")


@functools.cache
def mpnet_tokenizer(side: str = "right"):
    return AutoTokenizer.from_pretrained(
        data.minilm_path(), local_files_only=True, pad_token="[unused0]", padding_side=side
    )


@pytest.fixture(params=SIDES)
def side_tokenizer(request):
    return mpnet_tokenizer(request.param)


def batch(tokenizer, texts):
    return tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)


def run(model, inputs):
    with torch.inference_mode():
        out = model(**inputs)
    return out.last_hidden_state, out.pooler_output


def test_the_tokenizer_pads_with_mpnets_padding_index(side_tokenizer, texts):
    """What every left-padded comparison below rests on: the unpatched model sees a left-padded
    sequence as it sees it alone."""
    model = tiny_mpnet()
    inputs = batch(side_tokenizer, texts)
    assert side_tokenizer.pad_token_id == model.embeddings.padding_idx
    together = run(model, inputs)[0]
    for i, text in enumerate(texts):
        alone = run(model, batch(side_tokenizer, [text]))[0][0]
        real = inputs["attention_mask"][i].bool()
        assert torch.allclose(together[i, real], alone, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["tome", "evit", "ats"])  # every method: test_contracts, right-padded
def test_keep_one_is_bit_identical_on_both_padding_sides_and_remove_restores(
    method, attn, side_tokenizer, texts
):
    model = tiny_mpnet(attn)
    inputs = batch(side_tokenizer, texts)
    before = run(model, inputs)
    tokenfuse.apply(model, method, keep=1.0)
    for a, b in zip(before, run(model, inputs), strict=True):
        assert torch.equal(a, b)
    tokenfuse.apply(model, method, keep=0.5)
    assert run(model, inputs)[0].shape[1] < before[0].shape[1]
    tokenfuse.remove(model)
    for a, b in zip(before, run(model, inputs), strict=True):
        assert torch.equal(a, b)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("method", ["tome", "evit", "ats"])
def test_a_text_reduces_alone_as_in_a_padded_batch(method, side_tokenizer, texts):
    """The longest text sets the padding; every other one is compared with itself alone: reduced
    hidden states (real tokens, laid out first), [CLS] pooler and the embedding."""
    model = tokenfuse.apply(tiny_mpnet(), method, keep=0.5)
    inputs = batch(side_tokenizer, texts)
    hidden, pooled = run(model, inputs)
    count = tokenfuse.last_tokens(model).count
    assert hidden.shape[1] < inputs["input_ids"].shape[1]
    together = tokenfuse.embed(model, side_tokenizer, texts, batch_size=len(texts))
    for i, text in enumerate(texts):
        alone_hidden, alone_pooled = run(model, batch(side_tokenizer, [text]))
        assert alone_hidden.shape[1] == count[i]
        assert torch.allclose(alone_hidden[0], hidden[i, : int(count[i])], atol=1e-5), i
        assert torch.allclose(alone_pooled[0], pooled[i], atol=1e-5)
        alone = tokenfuse.embed(model, side_tokenizer, [text])
        assert torch.allclose(alone[0], together[i], atol=1e-5)


class MergeFirstAndFlip(Method):
    """A test device: in each sequence with something to remove, merges its first unprotected token
    into the second and lays the unprotected survivors out in reverse order. Slots then differ from
    original positions, and the merged token stands at one known position, its second token's (the
    one whose slot survives). Records which sequences it reduced at which point."""

    name = "merge-first-and-flip"
    paper = "none: a test device"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def decide(self, inp):
        tokens = inp.tokens
        B, N = tokens.size.shape
        position = torch.arange(N).expand(B, N)
        movable = tokens.mask & ~tokens.protected
        rank = movable.cumsum(1) - 1
        acts = (inp.remove > 0) & (movable.sum(1) >= 2)
        second = torch.where(movable & (rank == 1), position, N).amin(1)
        dest = torch.where(movable & (rank == 0) & acts[:, None], second[:, None], position)
        flipped = torch.where(movable, 2 * N - position, torch.where(position == 0, 0, 3 * N + position))
        self.calls.append((inp.point, acts.tolist()))
        return Reduction.hard(dest, order=torch.where(acts[:, None], flipped, position))


def expected_positions(method, inputs, layer):
    """Per sequence, the original positions (in the input's layout) of the tokens layer `layer`
    holds, in their order: what MergeFirstAndFlip did at the reduction points up to the layer,
    replayed on lists of positions, independently of the adapter."""
    mask = inputs["attention_mask"].bool()
    positions = [torch.arange(mask.shape[1])[row].tolist() for row in mask]
    for point, acts in method.calls:
        if point > layer:
            break
        for b, acted in enumerate(acts):
            if acted:
                p = positions[b]
                positions[b] = [p[0], *p[2:-1][::-1], p[-1]]  # p[1] merged into p[2], which stays
    return positions


def host_bias_between(model, positions):
    """(H, M, M) MPNet's relative position bias between the given original positions, computed with
    the host's own bucketing and table (relative position: key minus query, as the host takes it)."""
    p = torch.tensor(positions)
    encoder = model.encoder
    bucket = encoder.relative_position_bucket(p[None, :] - p[:, None])
    return encoder.relative_attention_bias(bucket).permute(2, 0, 1)


def test_position_bias_follows_the_original_positions_of_merged_and_moved_tokens(side_tokenizer, texts):
    model = tiny_mpnet()
    method = MergeFirstAndFlip(keep=0.5)
    tokenfuse.apply(model, method)
    used = {}
    for i, layer in enumerate(model.encoder.layer):
        layer.attention.attn.register_forward_pre_hook(lambda m, args, i=i: used.__setitem__(i, args[2]))
    inputs = batch(side_tokenizer, texts)
    run(model, inputs)
    assert method.calls[0][0] == 0 and sum(any(acts) for _, acts in method.calls) >= 2
    for i in range(len(model.encoder.layer)):
        for b, positions in enumerate(expected_positions(method, inputs, i)):
            M = len(positions)
            want = host_bias_between(model, positions)
            assert torch.equal(used[i][b, :, :M, :M], want), (i, b, side_tokenizer.padding_side)


class FlipOnce(Method):
    """A test device: removes nothing, and at the embeddings lays the tokens between [CLS] and
    [SEP] out in reverse order."""

    name = "flip-once"
    paper = "none: a test device"

    def decide(self, inp):
        B, N = inp.tokens.size.shape
        position = torch.arange(N).expand(B, N)
        if inp.point > 0:
            return Reduction.hard(position)
        order = torch.where(inp.tokens.protected, position + (position > 0) * 2 * N, 2 * N - position)
        return Reduction.hard(position, order=order)


def test_tokens_laid_out_anew_compute_what_the_host_computes(texts):
    """Attention is blind to the order of its tokens except through the position bias: with the
    tokens reversed at the embeddings and nothing removed, the reduction path must give the host's
    own output, reversed. A bias read at the tokens' slots instead of their positions fails this."""
    model = tiny_mpnet()
    for text in texts[:3]:
        inputs = batch(mpnet_tokenizer(), [text])
        want, want_pooled = run(model, inputs)
        tokenfuse.apply(model, FlipOnce(keep=0.5, prop_attn=False))
        got, got_pooled = run(model, inputs)
        assert tokenfuse.patch_of(model).decide_seconds > 0  # the path really ran
        tokenfuse.remove(model)
        flipped = want[0, 1:-1].flip(0)
        assert torch.allclose(got[0, 1:-1], flipped, atol=1e-5), (got[0, 1:-1] - flipped).abs().max()
        assert torch.allclose(got[0, [0, -1]], want[0, [0, -1]], atol=1e-5)
        assert torch.allclose(got_pooled, want_pooled, atol=1e-5)


def test_a_position_bias_of_another_layout_is_refused():
    """A transformers release that hands MPNet's layers its bias in another layout is told apart
    from one that hands none (nothing to follow)."""
    x = torch.zeros(2, 5, 8)
    assert host_position_bias(None, x) is None
    with pytest.raises(ValueError, match=r"shape \(2, 4, 5\).*\(batch, heads, 5, 5\)"):
        host_position_bias(torch.zeros(2, 4, 5), x)


def test_concurrent_passes_each_follow_their_own_positions(texts):
    """Passes of other lengths run at once in other threads (decisions slowed so that they
    interleave): each gets the position bias of its own tokens."""
    method = SlowToMe(keep=0.5)
    method.calls = []
    model = tokenfuse.apply(tiny_mpnet(), method)
    spans = [(0, 2), (1, 5), (2, 3), (3, 5)]
    batches = [batch(mpnet_tokenizer("left"), texts[i:j]) for i, j in spans]
    alone = [run(model, b) for b in batches]
    assert len({a[0].shape for a in alone}) == len(batches)  # every call has its own shape
    assert_runs_match(alone, *in_threads([functools.partial(run, model, b) for b in batches], repeats=2))


def test_the_pass_lets_its_position_biases_go_and_embed_pools_by_size(texts):
    tokenizer = mpnet_tokenizer()
    model = tokenfuse.apply(tiny_mpnet(), "tome", keep=0.5)
    inputs = batch(tokenizer, texts)
    hidden, _ = run(model, inputs)
    fwd = tokenfuse.patch_of(model).last
    assert fwd.tokens.origin is not None and fwd.host_bias is None and fwd.bias is None
    sizes = tokenfuse.token_sizes(model)
    embedded = tokenfuse.embed(model, tokenizer, texts, batch_size=len(texts), pooling="mean")
    assert torch.allclose(embedded, pool_mean(hidden, sizes), atol=1e-5)


def test_a_sequence_classifier_is_reduced_and_a_masked_lm_refused(texts):
    config = tiny_mpnet().config
    torch.manual_seed(0)
    model = MPNetForSequenceClassification(config).eval()
    inputs = batch(mpnet_tokenizer(), texts)
    with torch.inference_mode():
        before = model(**inputs).logits
        same = tokenfuse.apply(model, "tome", keep=1.0)(**inputs).logits
        reduced = tokenfuse.apply(model, "tome", keep=0.5)(**inputs).logits
    assert torch.equal(before, same) and reduced.shape == before.shape and not torch.equal(reduced, before)
    with pytest.raises(TypeError, match="MPNetForMaskedLM returns one output per input token"):
        tokenfuse.apply(MPNetForMaskedLM(config), "tome", keep=0.5)


def test_max_length_leaves_the_two_positions_before_the_first_token():
    """MPNet's position ids start after the padding index, as RoBERTa's: 130 positions hold 128 tokens."""
    from tokenfuse.api.text import model_max_length

    assert model_max_length(tiny_mpnet(), mpnet_tokenizer()) == 128
