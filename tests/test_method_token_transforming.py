"""Token Transforming: many-to-many shares whose one-hot limit is ToMe, sizes conserved, targets
kept whole, exact per-sequence counts in a padded batch."""

import math

import pytest
import torch
from conftest import MODELS

import tokenfuse
from tokenfuse.core import Tokens, reduce
from tokenfuse.methods import LayerInput, make


def layer(x, real, remove, q=None, k=None):
    n = x.shape[1]
    mask = torch.tensor([[i < r for i in range(n)] for r in real])
    positions = torch.arange(n)
    protected = (positions == 0) | (positions == torch.tensor(real)[:, None] - 1)
    tokens = Tokens.start(mask, protected & mask)  # [CLS] first, [SEP] last
    return LayerInput(point=1, x=x, tokens=tokens, remove=torch.tensor(remove), q=q, k=k, v=k)


def attention_layer(real, remove, seed=0, n=12, c=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(real), n, c, generator=g)
    qk = torch.randn(2, len(real), 2, n, 4, generator=g)
    return layer(x, real, remove, q=qk[0], k=qk[1])


@pytest.mark.parametrize("options", [{"k": 1}, {"k": 3, "temperature": 0}])
def test_one_hot_limit_is_tome_exactly(options):
    torch.manual_seed(0)
    inp = layer(torch.randn(2, 11, 8), real=[11, 7], remove=[4, 2])
    tome = make("tome").decide(inp)
    ours = make("transforming", **options).decide(inp)
    assert torch.equal(ours.dest[..., 0], tome.dest[..., 0])
    assert torch.all(ours.weight[..., 1:] == 0) and torch.all(ours.weight[..., 0] == 1)
    out, t = reduce(inp.x, inp.tokens, ours)
    expected, t_tome = reduce(inp.x, inp.tokens, tome)
    assert torch.equal(out, expected) and torch.equal(t.size, t_tome.size)


def test_a_source_is_split_over_its_targets_by_softmax_and_size_is_conserved():
    # A-tokens 0, 2, 4 and B-tokens 1, 3, 5; [CLS] (0) and [SEP] (5) are protected. Token 2 lies
    # between B-tokens 1 and 3, token 4 is unlike every B-token, so token 2 is the one removed.
    e = torch.eye(4)
    x = torch.stack([e[3], e[0], 2 * e[0] + e[1], e[1], e[2], e[3]])[None]
    inp = layer(x, real=[6], remove=[1])
    red = make("transforming", k=2, temperature=0.1).decide(inp)
    cos = torch.tensor([2.0, 1.0]) / math.sqrt(5)
    assert red.dest[0, 2].tolist() == [1, 3]
    assert torch.allclose(red.weight[0, 2], (cos / 0.1).softmax(0))
    out, t = reduce(x, inp.tokens, red)
    w1, w3 = red.weight[0, 2].tolist()
    assert t.size[0].tolist() == pytest.approx([1.0, 1 + w1, 1 + w3, 1.0, 1.0])
    assert t.size.sum().item() == pytest.approx(6.0)
    assert torch.allclose(out[0, 1], (x[0, 1] + w1 * x[0, 2]) / (1 + w1))
    assert torch.allclose(out[0, 2], (x[0, 3] + w3 * x[0, 2]) / (1 + w3))
    # a higher temperature spreads more evenly; equally similar targets share half and half
    soft = make("transforming", k=2, temperature=1.0).decide(inp).weight[0, 2]
    assert soft[1] > red.weight[0, 2, 1]
    x[0, 2] = e[0] + e[1]
    assert make("transforming", k=2).decide(inp).weight[0, 2].tolist() == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("targets", ["matching", "attention"])
def test_targets_stay_whole_and_sources_go_only_to_real_unprotected_targets(targets):
    inp = attention_layer(real=[12, 9, 5], remove=[5, 3, 1], seed=1)
    red = make("transforming", k=3, temperature=1.0, targets=targets).decide(inp)
    own = torch.arange(red.dest.shape[1]).expand(3, -1)
    moved = inp.tokens.mask & (red.dest[..., 0] != own)
    kept = inp.tokens.mask & ~moved
    assert torch.all(red.dest[..., 0][kept] == own[kept])
    assert torch.all(red.weight[kept][:, 0] == 1) and torch.all(red.weight[kept][:, 1:] == 0)
    shares = red.weight[moved]
    assert torch.allclose(shares.sum(-1), torch.ones(len(shares)))
    assert (shares > 0).sum(-1).max() > 1  # genuinely many-to-many at this temperature
    batch = torch.arange(3)[:, None, None].expand_as(red.dest)[moved]
    dest = red.dest[moved]
    live = shares > 0
    receivers = (batch[live], dest[live])
    assert kept[receivers].all()  # never a source, never padding
    assert not inp.tokens.protected[receivers].any() and not inp.tokens.protected[moved].any()


@pytest.mark.parametrize("targets", ["matching", "attention"])
def test_exact_removal_counts_per_sequence_in_a_padded_batch(targets):
    inp = attention_layer(real=[12, 9, 5], remove=[4, 3, 1], seed=2)
    red = make("transforming", k=2, targets=targets).decide(inp)
    _, t = reduce(inp.x, inp.tokens, red)
    assert t.count.tolist() == [8, 6, 4]
    assert torch.equal(t.size.sum(-1), inp.tokens.size.sum(-1))


def test_attention_targets_remove_exactly_up_to_one_movable_token():
    # Only [CLS] and [SEP] would be left: sizes need a movable target, so one stays.
    inp = attention_layer(real=[12, 6], remove=[10, 1], seed=3)
    red = make("transforming", targets="attention").decide(inp)
    _, t = reduce(inp.x, inp.tokens, red)
    assert t.count.tolist() == [3, 5]


def test_attention_targets_are_the_most_attended_tokens():
    n, real = 8, [8]
    x = torch.randn(1, n, 6)
    k = torch.zeros(1, 1, n, 4)
    k[0, 0, :, 0] = torch.tensor([0.0, 5, 1, 4, 2, 3, 0.5, 0])  # [CLS] attends most to 1, 3, 5
    q = torch.zeros(1, 1, n, 4)
    q[0, 0, 0, 0] = 4.0
    inp = layer(x, real, [3], q=q, k=k)
    red = make("transforming", targets="attention").decide(inp)
    moved = (red.dest[0, :, 0] != torch.arange(n)).nonzero().flatten().tolist()
    assert moved == [2, 4, 6]  # the three least attended movable tokens
    assert set(red.dest[0, moved][red.weight[0, moved] > 0].tolist()) <= {1, 3, 5}


@pytest.mark.parametrize("targets", ["matching", "attention"])
def test_a_sequence_is_reduced_the_same_alone_or_padded(targets):
    padded = attention_layer(real=[12, 7], remove=[4, 3], seed=4)
    alone = layer(padded.x[1:, :7], [7], [3], q=padded.q[1:, :, :7], k=padded.k[1:, :, :7])
    method = make("transforming", k=3, temperature=0.5, targets=targets)
    a, b = method.decide(padded), method.decide(alone)
    assert torch.equal(a.dest[1, :7], b.dest[0]) and torch.allclose(a.weight[1, :7], b.weight[0])


def test_attention_targets_on_a_model_keep_contracts(tokenizer, texts):
    model = tokenfuse.apply(MODELS["bert"](), "transforming", keep=0.4, targets="attention", k=3)
    together = tokenfuse.embed(model, tokenizer, texts, batch_size=len(texts))
    alone = tokenfuse.embed(model, tokenizer, texts[:1])  # padded in the batch, to the length of texts[2]
    assert torch.allclose(alone[0], together[0], atol=1e-5)
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        model(**inputs)
    sizes = tokenfuse.token_sizes(model)
    assert torch.equal(sizes.sum(-1), inputs["attention_mask"].sum(-1).float())


def test_options_and_needs():
    method = make("transforming")
    assert method.needs == {"hidden"}
    assert make("transforming", targets="attention", similarity="keys").needs == {"keys", "cls_attention"}
    assert method.options()["k"] == 2 and method.options()["targets"] == "matching"


@pytest.mark.parametrize(
    "options, match",
    [
        ({"k": 0}, "k"),
        ({"k": 1.5}, "k"),
        ({"k": True}, "k"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"similarity": "values"}, "similarity"),
        ({"targets": "random"}, "targets"),
    ],
)
def test_bad_options_are_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        make("transforming", **options)
