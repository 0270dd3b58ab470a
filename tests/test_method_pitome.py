import itertools
import math
import typing

import pytest
import torch
import torch.nn.functional as F

import tokenfuse
from tokenfuse.core import Tokens, reduce
from tokenfuse.core import schedule as sched
from tokenfuse.methods import LayerInput, make
from tokenfuse.methods.pitome import Kernel, depth_margin, energy, layer_schedule

DEFAULT = make("pitome").kernel


def layer(x, remove, real=None, point=1, num_layers=6, **options):
    """decide() on hand-made states; the first and last real token of each sequence are protected."""
    B, N, _ = x.shape
    real = real or [N] * B
    mask = torch.tensor([[i < r for i in range(N)] for r in real])
    protected = torch.tensor([[i in (0, r - 1) for i in range(N)] for r in real])
    tokens = Tokens.start(mask, protected)
    inp = LayerInput(point=point, x=x, tokens=tokens, remove=torch.tensor(remove), num_layers=num_layers)
    return make("pitome", **options).decide(inp).dest[..., 0], tokens


def near(direction, count, dim=8, noise=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(dim)
    base[direction] = 1.0
    return base + noise * torch.randn(count, dim, generator=g)


def moved(dest):
    return dest != torch.arange(dest.shape[-1])


@pytest.mark.parametrize("options", [{}, {"margin": 0.5}, {"margin": -0.5}])
@pytest.mark.parametrize("point", [0, 3, 6])
def test_isolated_token_is_never_merged_while_a_cluster_remains(options, point):
    # [CLS], six near-duplicates with one orthogonal token among them, [SEP]
    cluster = near(0, 6)
    x = torch.cat([near(5, 1), cluster[:3], near(1, 1), cluster[3:], near(6, 1)])[None]
    isolated = 4
    for remove in (1, 2, 3):
        dest, _ = layer(x, [remove], point=point, **options)
        dest = dest[0]
        assert moved(dest).sum() == remove
        assert dest[isolated] == isolated and not (dest[moved(dest)] == isolated).any()
        assert dest[0] == 0 and dest[-1] == len(dest) - 1  # protected stay put


def test_high_energy_tokens_are_those_of_the_largest_cluster():
    groups = [near(0, 5), near(1, 3, seed=1), near(2, 2, seed=2), near(3, 1, seed=3)]
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 2 + [3])
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    metric = F.normalize(torch.cat(groups)[perm], dim=-1)[None]
    movable = torch.ones(1, 11, dtype=torch.bool)
    for margin, kernel in itertools.product(
        (depth_margin(1, 6), depth_margin(6, 6), 0.0), typing.get_args(Kernel)
    ):
        score = energy(metric @ metric.transpose(1, 2), movable, margin, kernel)[0]
        ranked = labels[perm][score.argsort(descending=True)]
        assert ranked.tolist() == sorted(labels.tolist())  # cluster by cluster, largest first


def test_energy_is_the_mean_of_elu_of_similarity_minus_margin():
    sim = torch.full((1, 4, 4), 0.3)
    movable = torch.ones(1, 4, dtype=torch.bool)
    assert torch.allclose(energy(sim.clone(), movable, 0.2, "elu"), torch.full((1, 4), 0.1))
    below = energy(sim.clone(), movable, 0.5, "elu", alpha=2.0)
    assert torch.allclose(below, torch.full((1, 4), 2.0 * (math.exp(-0.2) - 1)))
    # a margin of -1 leaves every cosine in the linear part: mean similarity + 1
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(2, 5, 5, generator=g) * 2 - 1
    everything = torch.ones(2, 5, dtype=torch.bool)
    assert torch.allclose(energy(sim.clone(), everything, -1.0, "elu"), sim.mean(-1) + 1)


def gaussian(cos, margin):
    """The authors' text kernel, written out: the normal density of 1 - cos with sigma = 1 - margin."""
    sigma = 1 - margin
    return torch.exp(-0.5 * ((1 - cos) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


KERNEL_OF = {"elu": lambda cos, margin: F.elu(cos - margin), "gaussian": gaussian}


@pytest.mark.parametrize("kernel", typing.get_args(Kernel))
def test_energy_counts_only_the_sequences_own_movable_tokens(kernel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 7, 8, generator=g)
    alone, _ = layer(x, [2], kernel=kernel)
    padded = torch.randn(2, 10, 8, generator=g) * 5
    padded[1, :7] = x[0]
    padded[1, 0] = 100.0  # a different [CLS] must not change anything
    together, tokens = layer(padded, [3, 2], real=[10, 7], kernel=kernel)
    assert torch.equal(together[1, :7], alone[0])
    assert torch.equal(together[1, 7:], torch.arange(7, 10))
    metric = F.normalize(padded, dim=-1)
    movable = tokens.mask & ~tokens.protected
    score = energy(metric @ metric.transpose(1, 2), movable, 0.5, kernel)
    assert torch.all(score[~movable] == -torch.inf)
    own = F.normalize(x[0, 1:6], dim=-1)
    expected = KERNEL_OF[kernel](own @ own.T, 0.5).mean(-1)
    assert torch.allclose(score[1, 1:6], expected, atol=1e-6)


def test_candidates_alternate_by_energy_and_merge_into_their_most_similar_partner():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 14, 6, generator=g)
    dest, tokens = layer(x, [4], point=2)
    dest = dest[0]
    metric = F.normalize(x, dim=-1)
    sim = metric @ metric.transpose(1, 2)
    score = energy(sim.clone(), tokens.mask & ~tokens.protected, depth_margin(2, 6), DEFAULT)[0]
    order = score.argsort(descending=True, stable=True)
    a, b = order[:8:2], order[1:8:2]
    assert moved(dest).nonzero()[:, 0].tolist() == sorted(a.tolist())
    assert dest[a].tolist() == b[sim[0][a][:, b].argmax(-1)].tolist()


def test_exact_removal_counts_per_sequence_in_a_padded_batch():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 12, 8, generator=g)
    dest, tokens = layer(x, [4, 2, 5], real=[12, 7, 4])
    # the third sequence has 2 movable tokens: one merge at most
    assert moved(dest).sum(-1).tolist() == [4, 2, 1]
    assert torch.equal(dest[1, 7:], torch.arange(7, 12)) and torch.equal(dest[2, 4:], torch.arange(4, 12))
    _, after = reduce(x, tokens, make("pitome").decide(LayerInput(1, x, tokens, torch.tensor([4, 2, 5]))))
    assert after.count.tolist() == [8, 5, 3]
    assert after.size.sum(-1).tolist() == [12, 7, 4]


def test_margin_follows_depth():
    assert depth_margin(0, 12) == depth_margin(1, 12) == pytest.approx(0.9)
    assert depth_margin(12, 12) == pytest.approx(0.9 - 0.9 * 11 / 12)
    margins = [depth_margin(p, 12) for p in range(13)]
    assert all(a >= b for a, b in zip(margins, margins[1:], strict=False))


@pytest.mark.parametrize(
    "options",
    [
        {"margin": 1.0},
        {"margin": -1.5},
        {"margin": "high"},
        {"margin": True},
        {"alpha": 0},
        {"references": 0},
        {"kernel": "cosine"},
        {"split": "random"},
        {"margin_drop": -0.1},
        {"margin_drop": 2.0},
        {"layers": 0},
        {"layers": 1.5},
        {"layers": True},
    ],
)
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        make("pitome", **options)


def test_options_are_recorded():
    method = make("pitome", keep=0.6, margin=0.4, kernel="elu", alpha=2)
    assert method.options() == {
        "keep": 0.6,
        "schedule": None,
        "min_tokens": None,
        "prop_attn": True,
        "track_source": False,
        "static": False,
        "margin": 0.4,
        "alpha": 2.0,
        "references": 64,
        "kernel": "elu",
        "split": "alternate",
        "margin_drop": 0.9,
        "layers": None,
    }
    defaults = make("pitome").options()
    assert defaults["margin"] is None and defaults["kernel"] == "gaussian"  # the measured better kernel
    assert (defaults["split"], defaults["margin_drop"], defaults["layers"]) == ("alternate", 0.9, None)


def test_decide_uses_the_depth_margin_unless_one_is_fixed():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 14, 6, generator=g)
    deep, _ = layer(x, [4], point=6)
    early, _ = layer(x, [4], point=1)
    fixed, _ = layer(x, [4], point=1, margin=depth_margin(6, 6))
    assert torch.equal(deep, fixed) and not torch.equal(deep, early)


def test_reference_tokens_are_spread_over_each_sequences_own_movable_tokens():
    from tokenfuse.methods.pitome import references

    movable = torch.zeros(2, 12, dtype=torch.bool)
    movable[0, 1:11] = True  # 10 movable tokens
    movable[1, 1:4] = True  # 3 movable tokens, then padding
    at, ok = references(movable, 5)
    assert at[0].tolist() == [1, 3, 5, 7, 9] and ok[0].all()
    assert at[1][ok[1]].tolist() == [1, 2, 3] and ok[1].sum() == 3


def test_energy_from_references_is_exact_for_short_sequences_and_keeps_isolated_tokens():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 14, 6, generator=g)
    exact, _ = layer(x, [4], point=2, references=None)
    estimated, _ = layer(x, [4], point=2, references=64)
    assert torch.equal(exact, estimated)
    # a long sequence: 60 near-duplicates and one orthogonal token, energy from 8 references
    base = torch.zeros(6)
    base[0] = 1.0
    odd = torch.zeros(6)
    odd[1] = 1.0
    cluster = base + 0.01 * torch.randn(60, 6, generator=g)
    x = torch.cat([base[None], cluster[:30], odd[None], cluster[30:], base[None]])[None]
    dest, _ = layer(x, [20], point=2, references=8)
    assert dest[0, 31] == 31  # the isolated token stays while the cluster merges


def test_gaussian_energy_of_a_hand_made_set():
    # three unit vectors: cos(0, 1) = 0.8, cos(0, 2) = 0, cos(1, 2) = 0.6
    metric = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])[None]
    sim = metric @ metric.transpose(1, 2)
    movable = torch.ones(1, 3, dtype=torch.bool)
    margin = 0.75
    sigma = 0.25

    def g(cos):
        return math.exp(-0.5 * ((1 - cos) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))

    expected = [(g(1) + g(0.8) + g(0)) / 3, (g(0.8) + g(1) + g(0.6)) / 3, (g(0) + g(0.6) + g(1)) / 3]
    got = energy(sim.clone(), movable, margin, "gaussian")[0]
    assert torch.allclose(got, torch.tensor(expected))
    assert got.argmax() == 1  # the token between the two others is the most alike to the rest


def text_reference(x, ratio_r, margin):
    """The authors' text merge (pitome_text) for one unpadded sequence with a [CLS] at 0, written
    out from its formulas: Gaussian energy over all tokens but [CLS], the 2r highest are candidates,
    the r highest A, the next r B, each A into its most similar B. Returns dest over positions."""
    metric = F.normalize(x[1:], dim=-1)
    sim = metric @ metric.T
    sigma = 1 - margin
    energy_score = torch.exp(-(((1 - sim) / sigma) ** 2 * 0.5)).mean(-1) / (sigma * math.sqrt(2 * math.pi))
    indices = torch.argsort(energy_score, descending=True)
    a_idx, b_idx = indices[:ratio_r], indices[ratio_r : 2 * ratio_r]
    dst = sim[a_idx][:, b_idx].argmax(-1)
    dest = list(range(x.shape[0]))
    for a, d in zip(a_idx.tolist(), dst.tolist(), strict=True):
        dest[a + 1] = int(b_idx[d]) + 1
    return dest


@pytest.mark.parametrize("point", [1, 2, 3])
@pytest.mark.parametrize("remove", [1, 4, 7])
def test_text_form_matches_the_authors_text_merge(point, remove):
    g = torch.Generator().manual_seed(point * 10 + remove)
    x = torch.randn(1, 16, 8, generator=g)
    mask = torch.ones(1, 16, dtype=torch.bool)
    protected = torch.zeros_like(mask)
    protected[0, 0] = True  # [CLS] alone, as in the reference
    tokens = Tokens.start(mask, protected)
    inp = LayerInput(point=point, x=x, tokens=tokens, remove=torch.tensor([remove]), num_layers=6)
    options = dict(kernel="gaussian", split="halves", margin_drop=0.25, references=None)
    got = make("pitome", **options).decide(inp).dest[0, :, 0]
    # the reference's margins: 0.9 - 0.25 * i / L for layer i, reduced after layer i's attention
    margins = [0.9 - 0.25 * (i / 6) for i in range(6)]
    assert got.tolist() == text_reference(x[0], remove, margins[point - 1])


def test_halves_split_merges_the_k_highest_into_the_next_k():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 14, 6, generator=g)
    dest, tokens = layer(x, [4, 2], real=[14, 9], point=2, split="halves")
    metric = F.normalize(x, dim=-1)
    for b, k in enumerate((4, 2)):
        movable = tokens.mask[b : b + 1] & ~tokens.protected[b : b + 1]
        sim = metric[b : b + 1] @ metric[b : b + 1].transpose(1, 2)
        score = energy(sim.clone(), movable, depth_margin(2, 6), DEFAULT)[0]
        order = score.argsort(descending=True, stable=True)
        a, bb = order[:k], order[k : 2 * k]
        assert moved(dest[b]).nonzero()[:, 0].tolist() == sorted(a.tolist())
        assert dest[b, a].tolist() == bb[sim[0][a][:, bb].argmax(-1)].tolist()
    assert torch.equal(dest[1, 9:], torch.arange(9, 14))
    alone, _ = layer(x[1:, :9], [2], point=2, split="halves")
    assert torch.equal(alone[0], dest[1, :9])


def test_margin_drop_sets_how_far_the_depth_margin_falls():
    for point in range(1, 7):
        assert depth_margin(point, 6, 0.25) == pytest.approx(0.9 - 0.25 * (point - 1) / 6)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 14, 6, generator=g)
    slow, _ = layer(x, [4], point=6, margin_drop=0.25)
    fixed, _ = layer(x, [4], point=6, margin=0.9 - 0.25 * 5 / 6)
    assert torch.equal(slow, fixed)


def test_layers_reduce_only_after_the_chosen_layers_attention():
    first = layer_schedule(0.5, 6, 3)
    assert first[0] == 1.0 and first[4:] == [first[3]] * 3 and first[3] < first[2] < first[1] < 1.0
    last = layer_schedule(0.9, 6, -2)
    assert last[:5] == [1.0] * 5 and last[6] < last[5] < 1.0
    for schedule, keep in ((first, 0.5), (last, 0.9)):
        assert sched.work(schedule) == pytest.approx(keep)
    ratios = [first[p + 1] / first[p] for p in range(3)]
    assert ratios == pytest.approx([ratios[0]] * 3)  # each reducing layer keeps the same share
    with pytest.raises(ValueError, match="layers=-3"):
        layer_schedule(0.5, 6, -3)  # the last three layers alone cannot halve the work
    with pytest.raises(ValueError, match="at most half"):
        layer_schedule(0.25, 6, 3)  # it would take merging more than half the tokens at a point
    assert layer_schedule(0.3, 6, 3)[1] >= 0.5
    with pytest.raises(ValueError, match="has 6 layers"):
        make("pitome", layers=7).schedule_for(6)
    assert make("pitome", keep=0.5, layers=3).schedule_for(6) == first
    given = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    assert make("pitome", layers=3, schedule=given).schedule_for(6) == given


def test_layers_three_is_where_the_authors_text_code_reduces():
    # its per-layer ratios: `ratio` at list indices L-3..L-1, taken by pop() as layers 0, 1, 2 run
    num_layers = 6
    last3 = (num_layers - 1, num_layers - 2, num_layers - 3)
    listed = [0.7 if i in last3 else 1.0 for i in range(num_layers)]
    reducing = [i for i in range(num_layers) if listed.pop() < 1.0]
    assert reducing == [0, 1, 2]
    schedule = layer_schedule(0.6, num_layers, 3)
    assert [i for i in range(num_layers) if schedule[i + 1] < schedule[i]] == reducing


def test_on_a_model_only_the_chosen_layers_reduce(tokenizer, texts):
    from conftest import tiny_bert

    model = tokenfuse.apply(tiny_bert(layers=4), "pitome", keep=0.85, layers=-2)
    inputs = tokenizer(texts[2:3], return_tensors="pt")
    with torch.inference_mode():
        model(**inputs)
    trace = tokenfuse.patch_of(model).layer_tokens()[:, :, 0].tolist()
    n0 = int(inputs["attention_mask"].sum())
    assert trace[0] == trace[1] == [n0, n0]  # layers 0 and 1 untouched
    assert trace[2][0] == n0 and trace[2][1] < n0 and trace[3][1] < trace[3][0] == trace[2][1]


def test_gaussian_kernel_has_no_alpha():
    with pytest.raises(ValueError, match="alpha"):
        make("pitome", kernel="gaussian", alpha=2.0)
