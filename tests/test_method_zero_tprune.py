import math

import pytest
import torch

from tokenfuse.core import Tokens
from tokenfuse.methods import LayerInput, make


def graph_input(logits, remove, point=1, num_layers=12):
    """A layer whose attention has exactly the given logits: with D = N, q = sqrt(N) L and k = I."""
    n = logits.shape[-1]
    mask = torch.ones(1, n, dtype=torch.bool)
    protected = torch.zeros_like(mask)
    protected[0, [0, n - 1]] = True
    q = (math.sqrt(n) * logits)[None, None]
    k = torch.eye(n)[None, None]
    return LayerInput(
        point=point,
        x=torch.randn(1, n, 4),
        tokens=Tokens.start(mask, protected),
        remove=torch.tensor([remove]),
        num_layers=num_layers,
        q=q,
        k=k,
        v=k,
    )


def kept(method, inp):
    dest = method.decide(inp).dest[0, :, 0]
    return set((dest >= 0).nonzero().flatten().tolist())


def test_the_token_everyone_attends_to_ranks_first_and_is_kept():
    n, hub = 10, 6
    logits = torch.zeros(n, n)
    logits[:, hub] = 5.0
    inp = graph_input(logits, remove=n - 3)  # all movable tokens but one go
    assert kept(make("zero-tprune"), inp) == {0, hub, n - 1}
    assert kept(make("zero-tprune", similar_fraction=0.0), inp) == {0, hub, n - 1}


def test_importance_propagates_from_important_tokens():
    # Everyone attends to the hub 3; the hub attends to 5; four unimportant tokens also attend
    # to 6. By attention received in one step 6 beats 5; PageRank lets the hub's weight flow to 5.
    n, hub, favoured, popular = 10, 3, 5, 6
    logits = torch.zeros(n, n)
    logits[:, hub] = 4.0
    logits[[1, 2, 7, 8], popular] = 4.0
    logits[hub] = 0.0
    logits[hub, favoured] = 8.0
    inp = graph_input(logits, remove=n - 4)  # two movable tokens stay
    assert kept(make("zero-tprune", similar_fraction=0.0), inp) == {0, hub, favoured, n - 1}
    one_step = make("zero-tprune", similar_fraction=0.0, iterations=1)
    assert kept(one_step, inp) == {0, hub, popular, n - 1}


def test_heads_combine_by_root_mean_square_so_a_salient_token_is_not_averaged_away():
    # When every query of a head attends alike, its PageRank is that attention row. Token 3 is
    # salient in one head (0.6, 0.001), token 6 middling in both (0.38, 0.38): the mean of the
    # heads would keep 6, the paper's root mean square (EIR) keeps 3.
    n, salient, middling = 10, 3, 6
    rows = torch.full((2, n), 0.02 / (n - 2))
    rows[0, [salient, middling]] = torch.tensor([0.6, 0.38])
    rows[1] = 0.619 / (n - 2)
    rows[1, [salient, middling]] = torch.tensor([0.001, 0.38])
    logits = rows.log()[:, None, :].expand(2, n, n)
    inp = graph_input(logits[0], remove=n - 3)
    k = torch.eye(n).expand(1, 2, n, n)
    inp = LayerInput(**{**inp.__dict__, "q": math.sqrt(n) * logits[None], "k": k, "v": k})
    assert kept(make("zero-tprune", similar_fraction=0.0), inp) == {0, salient, n - 1}


@pytest.mark.parametrize("pair", [(2, 5), (1, 6), (3, 4)])
def test_near_duplicates_among_equally_unimportant_tokens_go_first(pair):
    # Uniform attention (q = 0): every token is equally important, keys are distinct one-hots
    # except for one near-duplicate pair, which is the one the S-stage drops a member of.
    n = 8
    k = torch.eye(n)
    k[pair[1]] = k[pair[0]] + 0.01 * torch.eye(n)[pair[1]]
    mask = torch.ones(1, n, dtype=torch.bool)
    protected = torch.zeros_like(mask)
    protected[0, [0, n - 1]] = True
    inp = LayerInput(
        point=4,
        x=torch.randn(1, n, 4),
        tokens=Tokens.start(mask, protected),
        remove=torch.tensor([1]),
        num_layers=12,
        q=torch.zeros(1, 1, n, n),
        k=k[None, None],
        v=k[None, None],
    )
    dropped = set(range(n)) - kept(make("zero-tprune", similar_fraction=1.0), inp)
    assert len(dropped) == 1 and dropped <= set(pair)
    hidden = LayerInput(**{**inp.__dict__, "x": k[None], "k": torch.eye(n)[None, None]})
    dropped = set(range(n)) - kept(make("zero-tprune", similarity="hidden", similar_fraction=1.0), hidden)
    assert len(dropped) == 1 and dropped <= set(pair)


def random_input(lengths, remove, point, n=None, seed=0):
    n = n or max(lengths)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[i < length for i in range(n)] for length in lengths])
    positions = torch.arange(n)
    protected = (positions == 0) | (positions == mask.sum(-1, keepdim=True) - 1)
    shape = (len(lengths), 2, n, 8)
    return LayerInput(
        point=point,
        x=torch.randn(len(lengths), n, 6, generator=gen),
        tokens=Tokens.start(mask, protected & mask),
        remove=torch.tensor(remove),
        num_layers=6,
        q=torch.randn(shape, generator=gen),
        k=torch.randn(shape, generator=gen),
        v=torch.randn(shape, generator=gen),
    )


@pytest.mark.parametrize("point", [2, 6])  # 30 PageRank iterations in layer 1, 1 in the last
@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_exact_counts_per_sequence_in_a_padded_batch_and_the_same_as_alone(fraction, point):
    lengths, remove = [24, 17, 9], [10, 8, 4]  # at fraction 1 the last two exceed the S-stage's half
    inp = random_input(lengths, remove, point)
    method = make("zero-tprune", similar_fraction=fraction)
    dest = method.decide(inp).dest[..., 0]
    own = torch.arange(dest.shape[1]).expand_as(dest)
    assert ((dest == -1).sum(-1)).tolist() == remove
    assert torch.all((dest == own) | (dest == -1))  # pruned, never merged
    assert torch.all(dest[~inp.tokens.mask] == own[~inp.tokens.mask])  # padding untouched
    assert torch.all(dest[inp.tokens.protected] >= 0)
    for b, length in enumerate(lengths):
        alone = LayerInput(
            point=inp.point,
            x=inp.x[b : b + 1, :length],
            tokens=Tokens.start(
                inp.tokens.mask[b : b + 1, :length], inp.tokens.protected[b : b + 1, :length]
            ),
            remove=inp.remove[b : b + 1],
            num_layers=inp.num_layers,
            q=inp.q[b : b + 1, :, :length],
            k=inp.k[b : b + 1, :, :length],
            v=inp.v[b : b + 1, :, :length],
        )
        assert torch.equal(method.decide(alone).dest[0, :, 0], dest[b, :length])


def test_needs_follow_the_similarity_and_options_are_recorded():
    assert make("zero-tprune").needs == frozenset({"attention"})
    method = make("zero-tprune", similarity="hidden", similar_fraction=0.25, iterations=3)
    assert method.needs == frozenset({"attention", "hidden"})
    assert method.options()["similar_fraction"] == 0.25 and method.options()["iterations"] == 3


@pytest.mark.parametrize(
    "options",
    [
        {"similarity": "values"},
        {"similar_fraction": 1.5},
        {"similar_fraction": -0.1},
        {"similar_fraction": True},
        {"iterations": 0},
        {"iterations": 2.5},
        {"iterations": True},
    ],
)
def test_bad_options_are_rejected(options):
    with pytest.raises(ValueError):
        make("zero-tprune", **options)
