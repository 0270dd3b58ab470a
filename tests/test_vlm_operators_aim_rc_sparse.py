"""AIM, Recoverable Compression and SparseVLM on synthetic inputs: exact counts, text and padding left
alone, keep 1.0 a no-op, and each operator's defining behaviour."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from tokenfuse.core import Tokens, reduce
from tokenfuse.methods import VisualInput, make
from tokenfuse.methods.vlm.sparsevlm import density_peaks

C = 8  # feature width


def pad_stack(rows: list[torch.Tensor], value=0) -> torch.Tensor:
    """Stack per-row tensors whose first dimension differs, padding at the end."""
    n = max(r.shape[0] for r in rows)
    return torch.stack([F.pad(r, [0, 0] * (r.dim() - 1) + [0, n - r.shape[0]], value=value) for r in rows])


def boundary_input(method, rows: list[dict], fraction: float | None = None) -> VisualInput:
    """Images with n_i patches each, padded at the end. A row: x, projected, cls, keys, question."""
    mask = pad_stack([torch.ones(r["x"].shape[0], dtype=torch.bool) for r in rows], False)
    tokens = Tokens.start(mask, torch.zeros_like(mask))
    q = pad_stack([torch.ones(r["question"].shape[0], dtype=torch.bool) for r in rows], False)
    return VisualInput(
        x=pad_stack([r["x"] for r in rows]),
        tokens=tokens,
        visual=mask,
        keep=method.counts(mask.sum(1), fraction),
        grid=None,
        cls_attention=pad_stack([r["cls"] for r in rows]),
        keys=pad_stack([r["keys"] for r in rows]),
        projected=pad_stack([r["projected"] for r in rows]),
        question=pad_stack([r["question"] for r in rows]),
        question_mask=q,
    )


def image(n: int, seed: int, q: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, C, generator=g),
        "projected": torch.randn(n, 2 * C, generator=g),
        "cls": torch.rand(n, generator=g).softmax(0),
        "keys": torch.randn(n, C, generator=g),
        "question": torch.randn(q, 2 * C, generator=g),
    }


def sequence(before: int, n_visual: int, q: int, seed: int) -> dict:
    """One LLM sequence: `before` prompt tokens, the image's visual tokens, q question tokens."""
    g = torch.Generator().manual_seed(seed)
    n = before + n_visual + q
    visual = torch.zeros(n, dtype=torch.bool)
    visual[before : before + n_visual] = True
    return {
        "x": torch.randn(n, C, generator=g),
        "visual": visual,
        "attention": torch.rand(q, n, generator=g).softmax(-1),  # (Q, N)
    }


def llm_input(method, rows: list[dict], layer: int, fraction: float) -> VisualInput:
    mask = pad_stack([torch.ones(r["x"].shape[0], dtype=torch.bool) for r in rows], False)
    visual = pad_stack([r["visual"] for r in rows], False)
    tokens = Tokens.start(mask, mask & ~visual)
    attention = [r["attention"] for r in rows]
    q = max(a.shape[0] for a in attention)
    text = torch.stack([F.pad(a, (0, mask.shape[1] - a.shape[1], 0, q - a.shape[0])) for a in attention])
    question_mask = pad_stack([torch.ones(a.shape[0], dtype=torch.bool) for a in attention], False)
    return VisualInput(
        x=pad_stack([r["x"] for r in rows]),
        tokens=tokens,
        visual=visual,
        keep=method.counts(visual.sum(1), fraction),
        layer=layer,
        text_attention=text,
        question_mask=question_mask,
    )


def apply(method, inp: VisualInput):
    return reduce(inp.x, inp.tokens, method.decide(inp))


def visual_left(method, inp: VisualInput) -> torch.Tensor:
    """Visual tokens per row after the reduction (the protected set is everything else)."""
    _, tokens = apply(method, inp)
    return (tokens.mask & ~tokens.protected).sum(1)


BOUNDARY = ["aim", "recoverable"]
LLM = ["aim-prune", "sparsevlm"]


def boundary_rows():
    rows = [image(24, 1), image(17, 2, q=2), image(9, 3, q=4)]
    for row in rows:  # the first token merges first, ahead of the padding
        row["projected"][1] = row["projected"][0]
    return rows


def llm_rows():
    return [sequence(3, 40, 5, 1), sequence(5, 23, 2, 2), sequence(4, 0, 3, 3)]  # the last: no image


@pytest.mark.parametrize("name", BOUNDARY)
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9])
def test_boundary_operators_leave_exactly_the_count(name, fraction):
    method = make(name, kind="visual")
    inp = boundary_input(method, boundary_rows(), fraction)
    assert visual_left(method, inp).tolist() == inp.keep.tolist()


@pytest.mark.parametrize("name", LLM)
@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5, 0.9])
def test_llm_operators_leave_exactly_the_count_and_text_alone(name, fraction):
    method = make(name, kind="visual")
    inp = llm_input(method, llm_rows(), 3, fraction)
    x, tokens = apply(method, inp)
    assert (tokens.mask & ~tokens.protected).sum(1).tolist() == inp.keep.tolist()
    for b in range(inp.x.shape[0]):  # the text tokens come out unchanged, in order
        text = inp.x[b][inp.tokens.protected[b]]
        assert torch.equal(x[b][tokens.protected[b]], text)
    assert torch.equal(x[2, : tokens.count[2]], inp.x[2, : inp.tokens.count[2]])  # no image: untouched


@pytest.mark.parametrize("name", BOUNDARY + LLM)
def test_keep_one_changes_nothing(name):
    method = make(name, kind="visual", keep=1.0)
    if method.placement == "boundary":
        inp = boundary_input(method, boundary_rows())
    else:
        inp = llm_input(method, llm_rows(), 3, method.stages()[0][1])
    x, tokens = apply(method, inp)
    assert torch.equal(x, inp.x) and torch.equal(tokens.size, inp.tokens.size)


@pytest.mark.parametrize("name", BOUNDARY + LLM)
def test_a_row_reduces_the_same_alone_and_in_a_padded_batch(name):
    method = make(name, kind="visual", keep=0.3)
    if method.placement == "boundary":
        rows = boundary_rows()
        batch, alone = boundary_input(method, rows), boundary_input(method, rows[1:2])
    else:
        rows = llm_rows()
        batch, alone = llm_input(method, rows, 3, 0.3), llm_input(method, rows[1:2], 3, 0.3)
    xb, tb = apply(method, batch)
    xa, ta = apply(method, alone)
    n = int(ta.count[0])
    torch.testing.assert_close(xb[1, :n], xa[0, :n], rtol=1e-6, atol=1e-6)
    assert torch.equal(tb.size[1, :n], ta.size[0, :n]) and not tb.mask[1, n:].any()


# ---- AIM ----


def test_aim_merges_the_most_similar_pair_first():
    method = make("aim", kind="visual")
    row = image(12, 0)
    row["projected"][5] = row["projected"][2] * 0.1  # A-token 2 and B-token 5: cosine 1, small dot product
    inp = boundary_input(method, [row], fraction=11 / 12)
    dest = method.decide(inp).dest[0, :, 0]
    assert dest[2] == 5 and (dest == torch.arange(12)).sum() == 11


def test_aim_repeats_rounds_of_at_most_half_until_the_count():
    """keep 0.25 is two rounds of at most half (odd counts: the smaller half): the same as keep 0.5
    applied twice."""
    half, quarter = make("aim", kind="visual", keep=0.5), make("aim", kind="visual", keep=0.25)
    inp = boundary_input(quarter, [image(32, 4), image(20, 5), image(9, 6)])
    x_once, t_once = apply(quarter, inp)

    first = boundary_input(half, [image(32, 4), image(20, 5), image(9, 6)])
    red = half.decide(first)
    x1, t1 = reduce(first.x, first.tokens, red)
    projected, _ = reduce(first.projected, first.tokens, red)
    second = VisualInput(
        x=x1, tokens=t1, visual=t1.mask, keep=inp.keep, projected=projected, question=first.question
    )
    x_twice, t_twice = apply(half, second)
    torch.testing.assert_close(x_once, x_twice)
    assert torch.equal(t_once.size, t_twice.size)
    assert t_once.size.max() > 2  # some token merged in both rounds


def test_aim_prune_schedule_is_the_papers_scaled_to_the_depth():
    # the reference on its 28-layer LLM: from layer 15 keep 7/8, 6/8, ... down to none from layer 22
    paper = make("aim-prune", kind="visual", layer=15, end=22, keep=1e-9).stages()
    assert [layer for layer, _ in paper] == list(range(15, 23))
    assert [f for _, f in paper] == pytest.approx(
        [7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0], abs=1e-8
    )
    default = make("aim-prune", kind="visual").stages()
    assert default[0][0] == 16 and default[-1] == (24, pytest.approx(1 / 576))
    assert all(a[1] > b[1] for a, b in pairwise(default))


def test_aim_prune_keeps_the_visual_tokens_the_question_attends_to():
    method = make("aim-prune", kind="visual")
    row = sequence(2, 10, 3, 0)
    row["attention"][:, 2 + 7] += 5.0  # every question token looks at visual token 7
    row["attention"][1, 2 + 6] += 9.0  # one looks hard at visual token 6
    inp = llm_input(method, [row], 16, 0.2)
    dest = method.decide(inp).dest[0, :, 0]
    kept = [i - 2 for i in range(2, 12) if dest[i] == i]
    assert sorted(kept) == [6, 7]


def test_multi_stage_operators_follow_their_stages_on_already_reduced_input():
    for name in LLM:
        method = make(name, kind="visual", keep=0.2)
        rows = llm_rows()
        start = llm_input(method, rows, 1, 1.0)
        x, tokens, visual = start.x, start.tokens, start.visual
        for layer, fraction in method.stages():
            g = torch.Generator().manual_seed(layer)
            attention = torch.rand(x.shape[0], 5, x.shape[1], generator=g).softmax(-1)
            inp = VisualInput(
                x=x,
                tokens=tokens,
                visual=visual,
                keep=method.counts(start.visual.sum(1), fraction),
                layer=layer,
                text_attention=attention * tokens.mask[:, None, :],
                question_mask=start.question_mask,
            )
            x, tokens = apply(method, inp)
            visual = tokens.mask & ~tokens.protected
            assert visual.sum(1).tolist() == inp.keep.tolist()


# ---- Recoverable Compression ----


def test_recoverable_recovers_a_token_matching_the_question_despite_a_low_cls_score():
    row = image(20, 6, q=2)
    row["cls"][13] = 0.0  # the lowest [CLS] score of all
    row["projected"][13] = row["question"][1] * 2  # but it is what the question asks about
    for recover, expected in ((0.25, True), (0.0, False)):
        method = make("recoverable", kind="visual", keep=0.4, recover=recover, clusters=0.25)
        dest = method.decide(boundary_input(method, [row])).dest[0, :, 0]
        assert (dest[13] == 13).item() is expected


def test_recoverable_merges_the_rest_into_the_nearest_centre_conserving_size():
    method = make("recoverable", kind="visual", keep=0.25, recover=0.25, clusters=0.5)
    row = image(16, 7)
    inp = boundary_input(method, [row])
    dest = method.decide(inp).dest[0, :, 0]
    survivors = (dest == torch.arange(16)).nonzero().flatten()
    assert len(survivors) == 4
    # the two centres: the highest [CLS] scores among tokens neither filtered nor recovered
    centres = [int(c) for c in survivors if (dest == c).sum() > 1]
    assert 1 <= len(centres) <= 2
    keys = F.normalize(row["keys"], dim=-1)
    for i in range(16):
        if dest[i] != i:  # merged: into the most key-similar of the centres
            assert dest[i] == max(centres, key=lambda c: float(keys[i] @ keys[c]))
    _, tokens = apply(method, inp)
    assert tokens.size.sum() == 16  # nothing dropped: every token is kept, recovered or merged


def test_recoverable_without_a_question_recovers_by_cls_attention():
    method = make("recoverable", kind="visual", keep=0.5)
    inp = boundary_input(method, [image(20, 8, q=2), image(20, 9, q=0)])
    dest = method.decide(inp).dest[1, :, 0]
    survivors = (dest == torch.arange(20)).nonzero().flatten()
    assert survivors.tolist() == sorted(inp.cls_attention[1].topk(10).indices.tolist())


def test_recoverable_rejects_shares_that_leave_no_visual_filter():
    with pytest.raises(ValueError, match="recover \\+ clusters"):
        make("recoverable", kind="visual", recover=0.5, clusters=0.5)


# ---- SparseVLM ----


def test_sparsevlm_stages_are_the_references_counts():
    assert make("sparsevlm", kind="visual").stages() == [(3, 300 / 576), (7, 200 / 576), (16, 110 / 576)]
    low = make("sparsevlm", kind="visual", keep=64 / 576).stages()
    assert [round(f * 576) for _, f in low] == [66, 30, 17]
    assert [f for _, f in make("sparsevlm", kind="visual", keep=1.0).stages()] == [1.0, 1.0, 1.0]


def test_sparsevlm_keeps_what_the_raters_attend_to_not_what_other_question_tokens_do():
    method = make("sparsevlm", kind="visual")
    before, n = 2, 10
    row = sequence(before, n, 2, 0)
    att = torch.zeros(2, before + n + 2)
    att[0, before : before + n] = 0.5 / n  # the rater: 0.9 of its attention on the image,
    att[0, before + 1] += 0.2  # most of it on visual tokens 1 and 2
    att[0, before + 2] += 0.2
    att[1, before + 6] = 0.6  # not a rater (0.6 on the image): all of it on visual token 6
    att[:, :before] = (1 - att.sum(-1, keepdim=True)) / before
    row["attention"] = att
    inp = llm_input(method, [row], 3, 0.3)  # 3 kept: 2 chosen + 1 recycled cluster
    dest = method.decide(inp).dest[0, :, 0]
    assert dest[before + 1] == before + 1 and dest[before + 2] == before + 2
    assert dest[before + 6] == -1  # dropped: only the non-rater looked at it
    single = llm_input(method, [row], 3, 0.1)  # one token left: the raters' choice, no cluster
    dest = method.decide(single).dest[0, before : before + n, 0]
    assert (dest >= 0).nonzero().flatten().tolist() == [1]


@pytest.mark.parametrize("name", LLM)
def test_llm_operators_refuse_an_image_without_a_question(name):
    method = make(name, kind="visual")
    rows = llm_rows()
    rows[1]["attention"] = rows[1]["attention"][:0]
    with pytest.raises(ValueError, match="no question token"):
        method.decide(llm_input(method, rows, 3, 0.5))


def test_sparsevlm_recycles_pruned_tokens_into_clusters_that_conserve_size():
    method = make("sparsevlm", kind="visual")
    before, n = 1, 40
    row = sequence(before, n, 1, 0)
    att = torch.zeros(1, before + n + 1)
    att[0, before : before + 8] = 3.0  # 8 chosen
    att[0, before + 8 : before + 18] = 2.0  # the 10 recycled: 30% of the 32 pruned, + 1
    att[0, before + 18 : before + n] = 1.0  # dropped
    row["attention"] = att.softmax(-1)
    g = torch.Generator().manual_seed(0)
    group = torch.randn(2, C, generator=g) * 10
    for i in range(10):  # the recycled tokens form two tight groups
        row["x"][before + 8 + i] = group[i % 2] + 0.01 * torch.randn(C, generator=g)
    inp = llm_input(method, [row], 3, 10 / 40)  # 30 removed: 2 clusters, 8 chosen
    dest = method.decide(inp).dest[0, :, 0]
    recycled = dest[before + 8 : before + 18]
    assert len(set(recycled[0::2].tolist())) == 1 and len(set(recycled[1::2].tolist())) == 1
    assert recycled[0] != recycled[1]
    assert (dest[before + 18 : before + n] == -1).all()
    x, tokens = apply(method, inp)
    visual = tokens.mask & ~tokens.protected
    assert sorted(tokens.size[visual].tolist()) == [1.0] * 8 + [5.0, 5.0]  # size conserved per cluster
    means = [inp.x[0, before + 8 + i : before + 18 : 2].mean(0) for i in (0, 1)]
    for merged in x[0][tokens.size[0] == 5]:  # each cluster is the mean of its members
        assert min(float((merged - m).abs().max()) for m in means) < 1e-5


def test_density_peaks_picks_one_centre_per_dense_group():
    x = torch.tensor([[0.0, 0], [0.1, 0], [0, 0.1], [5, 5], [5.1, 5], [9, 9]])[None]
    members = torch.tensor([[True] * 5 + [False]])
    centres, target = density_peaks(x, members, torch.tensor([2]))
    assert centres[0, :3].sum() == 1 and centres[0, 3:5].sum() == 1 and not centres[0, 5]
    groups = target[0, :5].tolist()
    assert len(set(groups[:3])) == 1 and len(set(groups[3:5])) == 1 and groups[0] != groups[3]
