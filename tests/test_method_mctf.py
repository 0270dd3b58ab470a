import pytest
import torch

from tokenfuse.core import Tokens, reduce
from tokenfuse.methods import LayerInput, make
from tokenfuse.methods.mctf import attention_received


def layer(x, q=None, k=None, sizes=None, real=None, protect_ends=False, remove=(1,), prop_attn=True):
    """A LayerInput for B sequences of N tokens: `real` tokens each (the rest padding), given sizes."""
    B, N, _ = x.shape
    real = real or [N] * B
    mask = torch.arange(N)[None, :] < torch.tensor(real)[:, None]
    protected = torch.zeros_like(mask)
    if protect_ends:
        protected[:, 0] = True
        protected[torch.arange(B), torch.tensor(real) - 1] = True
    tokens = Tokens.start(mask, protected)
    if sizes is not None:
        tokens = Tokens(size=torch.tensor(sizes, dtype=torch.float32) * mask, protected=tokens.protected)
    return LayerInput(
        point=1, x=x, tokens=tokens, remove=torch.tensor(remove), q=q, k=k, v=k, prop_attn=prop_attn
    )


def groups(dest):
    """The merged groups of one sequence, as sets of positions (singletons left out)."""
    out = {}
    for i, d in enumerate(dest.tolist()):
        out.setdefault(d, set()).add(i)
    return sorted((g for g in out.values() if len(g) > 1), key=min)


def graded_attention(received_order, n, heads=2, dim=4):
    """q/k where every query attends to token i in proportion to exp(received_order[i])."""
    k = torch.zeros(1, heads, n, dim)
    k[..., 0] = torch.tensor(received_order, dtype=torch.float32)
    q = torch.zeros(1, heads, n, dim)
    q[..., 0] = dim**0.5  # logits q.k / sqrt(dim) = received_order[i]
    return q, k


def reference(x, attn, size, r, taus, bidirection):
    """The reference code's algorithm for one unpadded sequence, written out plainly: the product of
    max-normalised criteria, r // 2 merges A -> B, then r - r // 2 merges B -> unmerged A."""
    ts, ti, tz = taus
    metric = x / x.norm(dim=-1, keepdim=True)
    a, b = metric[::2], metric[1::2]
    w = ((a @ b.T + 1) / 2) ** (1 / ts)
    info = 1 / attn
    info = info / info.max()
    w = w * (info[::2, None] * info[None, 1::2]) ** (1 / ti)
    small = 1 / size
    small = small / small.max()
    w = w * (small[::2, None] * small[None, 1::2]) ** (1 / tz)
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    dest = list(range(x.shape[0]))
    best, partner = w.max(-1)
    src = best.argsort(descending=True, stable=True)[:r1].tolist()
    for i in src:
        dest[2 * i] = 2 * int(partner[i]) + 1
    left = [i for i in range(a.shape[0]) if i not in src]
    best2, partner2 = w[left].T.max(-1)
    for j in best2.argsort(descending=True, stable=True)[:r2].tolist():
        dest[2 * j + 1] = 2 * left[int(partner2[j])]
    return [dest[d] for d in dest]


@pytest.mark.parametrize("taus", [(1.0, 20.0, 40.0), (2.0, 0.5, 0.25)])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("r", [1, 5])
def test_matches_the_reference_algorithm(taus, bidirectional, r):
    torch.manual_seed(r)
    n, heads, dim = 12, 2, 4
    x = torch.randn(1, n, 8)
    q, k = torch.randn(2, 1, heads, n, dim).unbind(0)
    sizes = torch.randint(1, 5, (1, n)).float()
    inp = layer(x, q, k, sizes=sizes.tolist(), remove=[r])
    attn = inp.attention().mean(dim=(1, 2))[0]  # the full map: exact here, as queries = n
    expected = reference(x[0], attn, sizes[0], r, taus, bidirectional)
    tau_sim, tau_info, tau_size = taus
    method = make(
        "mctf", bidirectional=bidirectional, tau_sim=tau_sim, tau_info=tau_info, tau_size=tau_size, queries=n
    )
    got = method.decide(inp).dest[0, :, 0]
    assert got.tolist() == expected
    assert (got != torch.arange(n)).sum().item() == r


@pytest.mark.parametrize("bidirectional", [True, False])
def test_with_equal_similarity_the_least_attended_tokens_fuse_first(bidirectional):
    order = [3.0, 2.0, 1.0, 0.5, 2.5, 0.0, 1.5, 3.5]  # least attended: A at 2, B at 5
    q, k = graded_attention(order, 8)
    x = torch.ones(1, 8, 4)  # every pair equally similar
    inp = layer(x, q, k, remove=[1], prop_attn=False)
    dest = make("mctf", bidirectional=bidirectional).decide(inp).dest[0, :, 0]
    assert groups(dest) == [{2, 5}]
    # with informativeness off, attention no longer picks the pair
    dest = make("mctf", bidirectional=bidirectional, tau_info=0).decide(inp).dest[0, :, 0]
    assert groups(dest) != [{2, 5}]


@pytest.mark.parametrize("bidirectional", [True, False])
def test_with_equal_informativeness_small_tokens_fuse_first(bidirectional):
    q, k = torch.zeros(2, 1, 2, 8, 4).unbind(0)  # every token receives the same attention
    x = torch.ones(1, 8, 4)
    sizes = [[3, 2, 1, 4, 2, 1, 4, 3]]  # smallest: A at 2, B at 5
    inp = layer(x, q, k, sizes=sizes, remove=[1], prop_attn=False)
    assert torch.allclose(attention_received(inp, 32), torch.full((1, 8), 1 / 8))
    dest = make("mctf", bidirectional=bidirectional).decide(inp).dest[0, :, 0]
    assert groups(dest) == [{2, 5}]


def test_with_informativeness_and_size_neutral_it_is_similarity_matching():
    torch.manual_seed(0)
    q, k = torch.zeros(2, 1, 2, 10, 4).unbind(0)
    x = torch.randn(1, 10, 16)
    x[0, 3] = x[0, 2] + 0.01 * torch.randn(16)  # the most similar pair: A 2 -> B 3
    x[0, 6] = x[0, 5] + 0.05 * torch.randn(16)  # the next: only B 5 -> A 6 can take it
    inp = layer(x, q, k, remove=[2], prop_attn=False)
    dest = make("mctf").decide(inp).dest[0, :, 0]
    assert dest[2] == 3 and dest[5] == 6 and groups(dest) == [{2, 3}, {5, 6}]
    # one-directional, it is ToMe's matching on the hidden states, whatever the count
    for r in (1, 3, 5):
        inp = layer(x, q, k, remove=[r], prop_attn=False)
        ours = make("mctf", bidirectional=False).decide(inp).dest
        assert torch.equal(ours, make("tome").decide(inp).dest)


def test_exact_counts_per_sequence_in_a_padded_batch_and_padding_invariance():
    torch.manual_seed(1)
    real, remove = [16, 11, 6, 3], [7, 4, 2, 1]
    x = torch.randn(4, 16, 8)
    q, k = torch.randn(2, 4, 2, 16, 4).unbind(0)
    inp = layer(x, q, k, real=real, protect_ends=True, remove=remove)
    for queries in (16, 4):  # exact attention, and a subset of queries
        method = make("mctf", queries=queries)
        red = method.decide(inp)
        _, after = reduce(x, inp.tokens, red)  # also fails on a touched protected token
        assert after.count.tolist() == [16 - 7, 11 - 4, 6 - 2, 3]  # 3 tokens: [CLS], one B, [SEP]
        assert after.size.sum(-1).tolist() == real
        for b, n in enumerate(real):
            dest = red.dest[b, :, 0]
            assert torch.equal(dest[n:], torch.arange(n, 16))  # padding untouched
            one = (x[b : b + 1, :n], q[b : b + 1, :, :n], k[b : b + 1, :, :n])
            alone = layer(*one, protect_ends=True, remove=remove[b : b + 1])
            assert torch.equal(method.decide(alone).dest[0, :, 0], dest[:n])


def test_attention_is_estimated_from_evenly_spread_real_queries():
    torch.manual_seed(2)
    q, k = torch.randn(2, 2, 3, 12, 4).unbind(0)
    inp = layer(torch.randn(2, 12, 8), q, k, real=[12, 7])
    full = inp.attention().mean(1)  # (B, Nq, N)
    got = attention_received(inp, 4)
    assert torch.allclose(got[0], full[0, [0, 3, 6, 9]].mean(0))  # 12 tokens: every third query
    assert torch.allclose(got[1], full[1, [0, 1, 3, 5]].mean(0))  # 7 tokens: 0, 7/4, 14/4, 21/4
    assert torch.allclose(attention_received(inp, 12)[1], full[1, :7].mean(0))  # all, exactly
    assert torch.allclose(got.sum(-1), torch.ones(2))


def test_needs_and_options():
    method = make("mctf")
    assert method.needs == {"hidden", "attention"}
    assert make("mctf", tau_info=0).needs == {"hidden"}  # no attention, so it may reduce at point 0
    opts = method.options()
    assert (opts["tau_sim"], opts["tau_info"], opts["tau_size"]) == (1.0, 20.0, 40.0)
    assert opts["bidirectional"] is True and opts["queries"] == 8 and opts["fusion"] == "size"
    inp = layer(torch.randn(1, 6, 4), remove=[2])
    assert make("mctf", tau_info=0).decide(inp).dest.shape == (1, 6, 1)
    with pytest.raises(ValueError, match="no attention at reduction point"):
        method.decide(inp)


@pytest.mark.parametrize(
    "options",
    [
        {"tau_sim": -1},
        {"tau_info": float("inf")},
        {"tau_size": True},
        {"tau_sim": "1"},
        {"bidirectional": 1},
        {"queries": 0},
        {"queries": 2.5},
    ],
)
def test_bad_options_are_rejected(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        make("mctf", **options)


def reference_fusion(x, attn, size, dest):
    """The reference code's fusion by attention (its pooling_type=1) for one sequence: each token
    counts by the attention it receives times its size over the largest size, features summed
    into their destination and divided by the summed weights. Returns {destination: feature}."""
    w = attn * (size / size.max())
    out = {}
    for d in sorted(set(dest)):
        members = [i for i, e in enumerate(dest) if e == d]
        out[d] = sum(x[i] * w[i] for i in members) / sum(w[i] for i in members)
    return out


@pytest.mark.parametrize("bidirectional", [True, False])
def test_attention_fusion_is_the_attention_times_size_weighted_average(bidirectional):
    torch.manual_seed(3)
    n, heads, dim = 10, 2, 4
    x = torch.randn(1, n, 8)
    q, k = torch.randn(2, 1, heads, n, dim).unbind(0)
    sizes = torch.randint(1, 4, (1, n)).float()
    inp = layer(x, q, k, sizes=sizes.tolist(), remove=[4])
    # attention received, from the layer's softmax with log size on the logits (proportional attention)
    logits = q @ k.transpose(-1, -2) / dim**0.5 + sizes.log()[:, None, None, :]
    attn = logits.softmax(-1).mean(dim=(1, 2))[0]
    options = dict(bidirectional=bidirectional, queries=n)
    red = make("mctf", fusion="attention", **options).decide(inp)
    dest = red.dest[0, :, 0].tolist()
    assert dest == make("mctf", **options).decide(inp).dest[0, :, 0].tolist()  # same groups as by size
    fused, after = reduce(x, inp.tokens, red)
    expected = reference_fusion(x[0], attn, sizes[0], dest)
    assert groups(red.dest[0, :, 0])  # something was fused
    assert torch.allclose(fused[0], torch.stack([expected[d] for d in sorted(expected)]), atol=1e-5)
    assert after.size.sum() == sizes.sum()  # sizes still add up as counts, not weights
    by_size, _ = reduce(x, inp.tokens, make("mctf", **options).decide(inp))
    assert not torch.allclose(fused, by_size, atol=1e-3)  # and it is not the size-weighted average


def test_attention_fusion_survives_half_precision_when_a_group_is_barely_attended():
    # tokens 2 and 5 receive about e^-30 of what the others do: in float16 their weights would
    # round to 0 and their fused feature to 0, unless scaled per group
    order = [30.0, 30.0, 0.0, 30.0, 30.0, 0.0, 30.0, 30.0]
    q, k = graded_attention(order, 8)
    x = torch.ones(1, 8, 4, dtype=torch.float16)
    x[0, 2], x[0, 5] = 2.0, 4.0
    inp = layer(x, q.half(), k.half(), remove=[1], prop_attn=False)
    red = make("mctf", fusion="attention").decide(inp)
    assert groups(red.dest[0, :, 0]) == [{2, 5}]
    fused, _ = reduce(x, inp.tokens, red)
    assert torch.allclose(fused[0, 2].float(), torch.full((4,), 3.0))  # equal attention: the mean


def test_group_scaling_keeps_each_groups_ratios_and_gives_it_a_member_of_weight_one():
    from tokenfuse.methods.mctf import group_scaled

    weight = torch.tensor([[1e-30, 0.2, 3e-30, 0.4, 0.5, 7.0]])
    dest = torch.tensor([[2, 3, 2, 3, 4, 5]])
    mask = torch.tensor([[True] * 5 + [False]])
    scaled = group_scaled(weight, dest, mask)
    assert torch.allclose(scaled, torch.tensor([[1 / 3, 0.5, 1.0, 1.0, 1.0, 1.0]]))


def test_attention_fusion_reads_attention_even_without_informativeness():
    assert make("mctf", tau_info=0, fusion="attention").needs == {"hidden", "attention"}
    assert make("mctf", fusion="attention").options()["fusion"] == "attention"
    with pytest.raises(ValueError, match="fusion"):
        make("mctf", fusion="max")
