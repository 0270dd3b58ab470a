"""EViT: keep the tokens [CLS] attends to most, fuse the rest into one attention-weighted token."""

import math

import pytest
import torch

from tokenfuse.core import Tokens, reduce
from tokenfuse.methods import LayerInput, make


def layer_input(scores, remove, sizes=None, protected=None, has_cls=True, seed=0):
    """One head whose [CLS] query meets key i with logit scores[b][i]; 0 in sizes marks padding."""
    scores = torch.tensor(scores, dtype=torch.float32)
    B, N = scores.shape
    D = 4
    size = torch.ones(B, N) if sizes is None else torch.tensor(sizes, dtype=torch.float32)
    count = (size > 0).sum(-1)
    positions = torch.arange(N)
    if protected is None:  # [CLS] first, [SEP] last
        protected = (positions == 0) | (positions == count[:, None] - 1)
    tokens = Tokens(size=size, protected=torch.as_tensor(protected) & (size > 0))
    q = torch.zeros(B, 1, N, D)
    q[:, :, 0, 0] = D**0.5  # the [CLS] query; the scale of the dot product cancels it
    k = torch.zeros(B, 1, N, D)
    k[:, 0, :, 0] = scores
    x = torch.randn(B, N, 3, generator=torch.Generator().manual_seed(seed))
    return LayerInput(
        point=1, x=x, tokens=tokens, remove=torch.tensor(remove), q=q, k=k, v=k, has_cls=has_cls
    )


def decide(inp):
    return make("evit", keep=0.5).decide(inp)


def test_keeps_exactly_the_most_attended_movable_tokens():
    # movable tokens 1..6; [CLS] (0) and [SEP] (7) score lowest yet are never candidates
    scores = [[-5.0, 0.3, 2.0, -1.0, 1.5, 0.0, 0.7, -5.0], [-5.0, 1.0, 0.0, 3.0, 2.0, -5.0, 0.0, 0.0]]
    sizes = [[1] * 8, [1, 1, 1, 1, 1, 1, 0, 0]]
    inp = layer_input(scores, [3, 2], sizes)
    dest = decide(inp).dest[..., 0]
    # sequence 0: keep 2 and 4 (the two most attended); fuse 1, 3, 5, 6 into 6, the best of them
    assert dest[0].tolist() == [0, 6, 2, 6, 4, 6, 6, 7]
    # sequence 1 (6 real tokens, movable 1..4): keep 3; fuse 1, 2, 4 into 4; padding untouched
    assert dest[1].tolist() == [0, 4, 4, 3, 4, 5, 6, 7]
    _, after = reduce(inp.x, inp.tokens, decide(inp))
    assert after.count.tolist() == [8 - 3, 6 - 2]  # the fused token counts as one


def test_fused_token_is_the_attention_weighted_average_and_holds_their_size():
    scores = [[-5.0, 0.3, 2.0, -1.0, 1.5, 0.0, 0.7, -5.0]]
    inp = layer_input(scores, [3])
    out, after = reduce(inp.x, inp.tokens, decide(inp))
    a = inp.cls_attention()[0]
    fused = [1, 3, 5, 6]
    expected = (a[fused, None] * inp.x[0, fused]).sum(0) / a[fused].sum()
    # survivors in order: 0, 2, 4, 6 (the fused token), 7
    assert torch.allclose(out[0, 3], expected, atol=1e-6)
    assert not torch.allclose(out[0, 3], inp.x[0, fused].mean(0), atol=1e-3)  # not a plain mean
    assert after.size[0].tolist() == [1, 1, 1, 4, 1]
    for i, j in [(0, 0), (1, 2), (2, 4), (4, 7)]:
        assert torch.equal(out[0, i], inp.x[0, j])  # kept tokens pass through unchanged


def test_merged_tokens_are_weighted_by_the_attention_they_received_not_twice_by_size():
    # token 1 already stands for 3; proportional attention has counted that in its attention
    scores = [[-5.0, 0.5, 3.0, 0.2, -0.4, -5.0]]
    inp = layer_input(scores, [2], sizes=[[1, 3, 1, 1, 2, 1]])
    out, after = reduce(inp.x, inp.tokens, decide(inp))
    a = inp.cls_attention()[0]
    assert (a[1] / a[3]).item() == pytest.approx(3 * math.exp(0.5 - 0.2), rel=1e-5)
    fused = [1, 3, 4]
    expected = (a[fused, None] * inp.x[0, fused]).sum(0) / a[fused].sum()
    assert torch.allclose(out[0, 1], expected, atol=1e-6)
    assert after.size[0].tolist() == [1, 6, 1, 1]


def test_protected_tokens_are_never_candidates():
    scores = [[-5.0, 1.0, -9.0, 2.0, 0.5, 0.0, -5.0]]
    protected = [[True, False, True, False, False, False, True]]  # a caller-protected low scorer at 2
    dest = decide(layer_input(scores, [2], protected=protected)).dest[0, :, 0]
    assert dest.tolist() == [0, 1, 2, 3, 1, 1, 6]  # keep 3; fuse 1, 4, 5 into 1


def test_nothing_to_remove_fuses_nothing_and_the_budget_is_capped_by_movable_tokens():
    scores = [[-5.0, 1.0, 0.0, 2.0, -5.0], [-5.0, 1.0, 0.0, 2.0, -5.0]]
    dest = decide(layer_input(scores, [0, 9])).dest[..., 0]
    assert dest[0].tolist() == [0, 1, 2, 3, 4]
    assert dest[1].tolist() == [0, 3, 3, 3, 4]  # all three movable tokens become one


def test_vanishing_attention_falls_back_to_a_finite_average():
    # exp(-200) underflows to 0 in float32: the inattentive tokens still fuse into their mean
    scores = [[-5.0, 200.0, 0.0, 0.0, 0.0, -5.0]]
    inp = layer_input(scores, [2])
    out, _ = reduce(inp.x, inp.tokens, decide(inp))
    assert torch.allclose(out[0, 2], inp.x[0, 2:5].mean(0), atol=1e-6)


def test_a_model_without_cls_is_refused_and_point_zero_is_skipped():
    inp = layer_input([[0.0, 1.0, 2.0, 0.0]], [1], has_cls=False)
    with pytest.raises(ValueError, match=r"no \[CLS\] token"):
        decide(inp)
    method = make("evit", keep=0.5)
    assert method.needs == {"cls_attention"} and not method.prunes
    assert method.schedule_for(4)[0] == 1.0  # no attention at the embeddings


def test_unknown_options_are_rejected():
    with pytest.raises(TypeError, match="evit"):
        make("evit", keep_rate=0.7)
