"""EViT, ATS, Zero-TPrune, PiToMe and MCTF set as their papers, against their authors' code run on the
seeded inputs of scripts/fixtures_token_methods.py (one layer's selection or merge; the fixtures
record repository and commit). Token Transforming has no fixture: its repository publishes no code."""

from pathlib import Path

import pytest
import torch

from tokenfuse.core import Tokens, reduce
from tokenfuse.methods import LayerInput, make
from tokenfuse.methods.zero_tprune import _importance, _pagerank

FIXTURES = Path(__file__).parent / "data" / "fixtures"


def load_fixture(name: str) -> dict:
    fixture = torch.load(FIXTURES / f"{name}.pt")
    assert len(fixture["commit"]) == 40 and fixture["cases"]
    return {**fixture, "cases": [{k: as_float(v) for k, v in case.items()} for case in fixture["cases"]]}


def as_float(value):
    return value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.float16 else value


def layer_input(x, q=None, k=None, v=None, remove=0, size=None) -> LayerInput:
    """Point 1 of a 12-layer model: [CLS] first and protected, sizes 1 unless given, sources tracked."""
    B, N, _ = x.shape
    size = torch.ones(B, N) if size is None else size
    protected = (torch.arange(N) == 0).expand(B, N)
    tokens = Tokens(size=size, protected=protected, source=torch.diag_embed(size))
    remove = torch.full((B,), remove) if isinstance(remove, int) else remove
    return LayerInput(point=1, x=x, tokens=tokens, remove=remove, num_layers=12, q=q, k=k, v=v)


def groups_and_gap(after: Tokens, out: torch.Tensor, source: torch.Tensor, expected: torch.Tensor):
    """How many of the reference's merge groups (source: B x M x N, which tokens each output holds)
    tokenfuse forms too, and the largest feature difference over those groups."""
    same, gap = 0, 0.0
    for b in range(out.shape[0]):
        mine = after.source[b] > 0
        for i, group in enumerate(source[b].bool()):
            j = (mine == group).all(-1).nonzero()
            if len(j) == 1:
                same += 1
                gap = max(gap, (out[b, j[0, 0]] - expected[b, i]).abs().max().item())
    return same, gap


def test_evit_keeps_the_authors_tokens_and_fuses_the_rest_as_their_weighted_sum_normalised():
    for case in load_fixture("evit")["cases"]:
        x = case["hidden"]
        B, N, _ = x.shape
        # the authors keep left_tokens patches plus the fused one: tokenfuse's remove, r, fuses r + 1
        inp = layer_input(x, case["q"], case["k"], remove=N - 1 - case["left_tokens"] - 1)
        assert torch.allclose(inp.cls_attention()[:, 1:], case["cls_attn"], rtol=0, atol=1e-7)
        reduction = make("evit").decide(inp)
        out, after = reduce(x, inp.tokens, reduction)
        dest = reduction.dest[..., 0]
        for b in range(B):
            alone = [i for i in range(1, N) if dest[b, i] == i and int((dest[b] == i).sum()) == 1]
            assert sorted(alone) == sorted((case["idx"][b] + 1).tolist())
            assert torch.equal(x[b, case["idx"][b] + 1], case["out"][b, 1:-1])  # kept tokens unchanged
            fused = dest[b] != torch.arange(N)
            target = int(dest[b][fused][0])
            slot = int((dest[b].unique() == target).nonzero())  # survivors keep their order
            total = case["cls_attn"][b][(dest[b] == target)[1:]].sum()
            # the authors' fused token is the attention-weighted sum; tokenfuse's the weighted average
            assert torch.allclose(out[b, slot] * total, case["out"][b, -1], rtol=0, atol=1e-6)
            assert (out[b, slot] - case["out"][b, -1]).abs().max() > 0.25  # the stated deviation's size
        authors, _ = reduce(x, inp.tokens, make("evit", fuse="authors").decide(inp))
        others = ~torch.isclose(authors, out).all(-1)  # only the fused token differs
        assert int(others.sum()) == B
        for b in range(B):
            assert torch.allclose(authors[b, others[b]][0], case["out"][b, -1], rtol=0, atol=1e-6)


def test_ats_scores_tokens_as_the_authors_and_samples_by_the_paper():
    fixture = load_fixture("ats")
    differ = []
    for case in fixture["cases"]:
        x = case["x"]
        B, N, _ = x.shape
        inp = layer_input(x, case["q"], case["k"], case["v"])
        score = (inp.cls_attention() * inp.value_norms())[:, 1:]
        score = score / score.sum(-1, keepdim=True)
        expected = torch.zeros_like(score).scatter_(1, case["sorted_indices"], case["sorted_scores"])
        assert torch.allclose(score, expected, rtol=0, atol=1e-6)  # their eps-stabilised softmax
        for b in range(B):
            # tokenfuse's K, the paper's midpoints on the plain CDF, set to the count the reference kept
            # with N - 1 points on its min-max rescaled CDF: the stated deviation, shown as a set difference
            kept = case["kept"][b]
            K = int(kept.sum()) - 1
            q, k, v = (case[name][b : b + 1] for name in "qkv")
            one = layer_input(x[b : b + 1], q, k, v, remove=torch.tensor([N - 1 - K]))
            mine = make("ats").decide(one).dest[0, :, 0] >= 0
            assert int(mine.sum()) - 1 <= K
            differ.append((K, int((mine & ~kept).sum()), int((kept & ~mine).sum())))
    # (reference's kept patches, kept only by tokenfuse, kept only by the reference)
    assert differ == [(39, 3, 8), (34, 6, 13), (21, 3, 12), (17, 1, 10)]


def test_zero_tprune_ranks_by_the_authors_weighted_pagerank_and_keeps_their_tokens():
    for case in load_fixture("zero_tprune")["cases"]:
        q, k = case["q"], case["k"]
        B, _, N, _ = q.shape
        x = torch.zeros(B, N, 4)
        remove = (N - 1) - int((N - 1) * case["retain_rate"])
        inp = layer_input(x, q, k, remove=remove)
        alive = inp.tokens.mask
        score = _importance(_pagerank(inp.attention().float(), alive, 5), alive)[:, 1:]
        assert torch.allclose(score, case["importance"], rtol=1e-6, atol=0)
        # the I-stage alone, as the precursor has no S-stage, with its 5 iterations
        method = make("zero-tprune", similar_fraction=0.0, iterations=5)
        kept = method.decide(inp).dest[..., 0][:, 1:] >= 0
        assert torch.equal(kept, case["kept"])


@pytest.mark.parametrize("form", ["vision", "text"])
def test_pitome_merges_the_authors_groups_into_their_tokens(form):
    settings = {
        "vision": {"kernel": "elu", "split": "alternate"},
        "text": {"kernel": "gaussian", "split": "halves"},
    }
    cases = [case for case in load_fixture("pitome")["cases"] if case["form"] == form]
    assert cases
    for case in cases:
        x = case["x"]
        B, N, _ = x.shape
        T = N - 1  # the authors' r, with [CLS] set aside
        r = int(T - T * case["ratio"])
        method = make("pitome", margin=case["margin"], references=None, **settings[form])
        inp = layer_input(x, remove=r)
        out, after = reduce(x, inp.tokens, method.decide(inp))
        same, gap = groups_and_gap(after, out, case["source"], case["out"])
        assert same == B * case["source"].shape[1] == B * out.shape[1]
        assert gap <= 1e-5
        assert torch.equal(after.size.sort(-1).values, case["size"][..., 0].sort(-1).values)


def test_mctf_merges_the_authors_groups_with_either_fusion():
    for case in load_fixture("mctf")["cases"]:
        x, size = case["x"], case["size"][..., 0]
        B, N, _ = x.shape
        inp = layer_input(x, case["q"], case["k"], remove=case["r"], size=size)
        for pooling, fusion in ((0, "size"), (1, "attention")):
            source, expected = case[f"source_{pooling}"], case[f"out_{pooling}"]
            groups = B * source.shape[1]
            # every query read, as the reference averages the whole map
            exact = make("mctf", queries=N, fusion=fusion)
            out, after = reduce(x, inp.tokens, exact.decide(inp))
            same, gap = groups_and_gap(after, out, source, expected)
            assert (same, out.shape[1]) == (groups, source.shape[1])
            assert gap <= 1e-5
            # the default estimate from 8 queries: the stated deviation, a few groups differ
            out, after = reduce(x, inp.tokens, make("mctf", fusion=fusion).decide(inp))
            same, _ = groups_and_gap(after, out, source, expected)
            assert 0 < groups - same <= groups // 4
