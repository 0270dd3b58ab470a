"""The engine's contracts, on hand-made reductions."""

import math

import pytest
import torch
import torch.nn.functional as F

from tokenfuse.core import Reduction, Tokens, attention_bias, pool_mean, reduce, unmerge
from tokenfuse.core.matching import bipartite_merge


def state(sizes, protected=None, track_source=False):
    mask = torch.tensor(sizes) > 0
    protected = torch.zeros_like(mask) if protected is None else torch.tensor(protected)
    return Tokens.start(mask, protected, track_source)


def test_hard_merge_averages_by_size_and_conserves_size():
    x = torch.arange(12.0).view(1, 4, 3)
    tokens = state([[1, 1, 1, 1]])
    out, t1 = reduce(x, tokens, Reduction.hard(torch.tensor([[0, 2, 2, 3]])))
    assert t1.size.tolist() == [[1.0, 2.0, 1.0]]
    assert torch.equal(out[0, 1], (x[0, 1] + x[0, 2]) / 2)
    # merging a size-2 token with a size-1 token weighs them 2:1
    out2, t2 = reduce(out, t1, Reduction.hard(torch.tensor([[0, 1, 1]])))
    assert t2.size.tolist() == [[1.0, 3.0]]
    assert torch.allclose(out2[0, 1], x[0, 1:].mean(0))


def test_survivors_keep_their_order_and_padding_follows():
    x = torch.randn(2, 5, 4)
    tokens = state([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    dest = torch.tensor([[0, 1, 1, 3, 4], [0, 2, 2, 3, 4]])
    out, t = reduce(x, tokens, Reduction.hard(dest))
    assert t.size.tolist() == [[1, 2, 1, 1], [1, 2, 0, 0]]
    assert torch.equal(t.mask, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool())
    assert torch.allclose(out[0, 3], x[0, 4])
    assert torch.all(out[1, 2:] == 0)


def test_padding_never_moves_into_real_tokens():
    x = torch.randn(1, 4, 2)
    x[0, 3] = 1e6  # a padding position with a huge value
    tokens = state([[1, 1, 1, 0]])
    out, t = reduce(x, tokens, Reduction.hard(torch.tensor([[0, 1, 1, 1]])))
    assert t.size.tolist() == [[1.0, 2.0]]
    assert torch.allclose(out[0, 1], (x[0, 1] + x[0, 2]) / 2)


def test_soft_many_to_many_reduction_conserves_size():
    x = torch.randn(1, 4, 3)
    tokens = state([[1, 1, 1, 1]])
    dest = torch.tensor([[[0, 0], [1, 3], [1, 3], [3, 3]]])
    weight = torch.tensor([[[1.0, 0.0], [0.75, 0.25], [0.5, 0.5], [1.0, 0.0]]])
    out, t = reduce(x, tokens, Reduction(dest, weight))
    assert t.size.sum().item() == pytest.approx(4.0)
    assert t.size.tolist() == [[1.0, 1.25, 1.75]]
    expected = (0.75 * x[0, 1] + 0.5 * x[0, 2]) / 1.25
    assert torch.allclose(out[0, 1], expected, atol=1e-6)


def test_pruning_drops_size_and_feature_weight_changes_only_features():
    x = torch.randn(1, 4, 3)
    tokens = state([[1, 1, 1, 1]])
    pruned, t = reduce(x, tokens, Reduction.hard(torch.tensor([[0, -1, 2, 3]])))
    assert t.size.tolist() == [[1.0, 1.0, 1.0]] and torch.equal(pruned[0, 1], x[0, 2])
    red = Reduction.hard(torch.tensor([[0, 3, 3, 3]]))
    fused, t2 = reduce(x, tokens, Reduction(red.dest, red.weight, torch.tensor([[1.0, 1.0, 2.0, 1.0]])))
    assert t2.size.tolist() == [[1.0, 3.0]]
    assert torch.allclose(fused[0, 1], (x[0, 1] + 2 * x[0, 2] + x[0, 3]) / 4)


@pytest.mark.parametrize("dest", [[[1, 1, 2, 3]], [[0, 0, 2, 3]], [[-1, 1, 2, 3]]])
def test_touching_a_protected_token_is_an_error(dest):
    tokens = state([[1, 1, 1, 1]], protected=[[True, False, False, False]])
    with pytest.raises(RuntimeError, match="protected"):
        reduce(torch.randn(1, 4, 2), tokens, Reduction.hard(torch.tensor(dest)))


def test_proportional_attention_equals_attending_to_duplicates():
    """A key of size 3 with log(3) on its logit gets the attention of three identical copies."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
    dup_k = torch.cat([k[:, :, :1].expand(-1, -1, 3, -1), k[:, :, 1:]], 2)
    dup_v = torch.cat([v[:, :, :1].expand(-1, -1, 3, -1), v[:, :, 1:]], 2)
    expected = F.scaled_dot_product_attention(q, dup_k, dup_v)
    tokens = state([[3, 1, 1, 1]])
    tokens = Tokens(size=torch.tensor([[3.0, 1, 1, 1]]), protected=tokens.protected)
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias(tokens, q.dtype, True))
    assert torch.allclose(got, expected, atol=1e-6)
    flat = attention_bias(tokens, q.dtype, False)
    assert torch.equal(flat, torch.zeros_like(flat))


def test_attention_bias_masks_padding():
    bias = attention_bias(state([[1, 1, 0]]), torch.float32, True)
    assert bias.shape == (1, 1, 1, 3)
    assert bias[0, 0, 0, :2].tolist() == [0.0, 0.0] and bias[0, 0, 0, 2] < -1e30
    two = Tokens(size=torch.tensor([[2.0, 0.0]]), protected=torch.zeros(1, 2, dtype=torch.bool))
    assert attention_bias(two, torch.float32, True)[0, 0, 0, 0].item() == pytest.approx(math.log(2))


def test_size_weighted_pool_equals_masked_mean_without_reduction():
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    expected = torch.stack([x[0].mean(0), x[1, :2].mean(0)])
    assert torch.allclose(pool_mean(x, mask), expected, atol=1e-6)
    # after a merge, the pooled value is unchanged: a merged token counts as many as it holds
    tokens = state(mask.tolist())
    out, t = reduce(x, tokens, Reduction.hard(torch.tensor([[0, 1, 1, 3, 3], [0, 1, 2, 3, 4]])))
    assert torch.allclose(pool_mean(out, t.size), expected, atol=1e-6)


def test_unmerge_maps_every_original_position_to_its_token():
    x = torch.randn(1, 5, 3)
    tokens = state([[1, 1, 1, 1, 1]], track_source=True)
    out, t = reduce(x, tokens, Reduction.hard(torch.tensor([[0, 2, 2, 3, 3]])))
    out, t = reduce(out, t, Reduction.hard(torch.tensor([[0, 2, 2]])))
    full = unmerge(out, t)
    assert full.shape == (1, 5, 3)
    assert torch.allclose(full[0, 0], x[0, 0])
    for i in range(1, 5):
        assert torch.allclose(full[0, i], x[0, 1:].mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="track_source"):
        unmerge(out, Tokens(size=t.size, protected=t.protected))


def test_unmerge_spreads_soft_shares_and_fills_pruned_positions_with_the_mean():
    x = torch.randn(1, 4, 3)
    tokens = state([[1, 1, 1, 1]], track_source=True)
    # token 1 is split 0.25 / 0.75 between tokens 0 and 2; token 3 is pruned
    dest = torch.tensor([[[0, 0], [0, 2], [2, 2], [-1, -1]]])
    weight = torch.tensor([[[1.0, 0], [0.25, 0.75], [1, 0], [0, 0]]])
    out, t = reduce(x, tokens, Reduction(dest=dest, weight=weight))
    full = unmerge(out, t)
    assert torch.allclose(full[0, 0], out[0, 0]) and torch.allclose(full[0, 2], out[0, 1])
    assert torch.allclose(full[0, 1], 0.25 * out[0, 0] + 0.75 * out[0, 1], atol=1e-6)
    assert torch.allclose(full[0, 3], pool_mean(out, t.size)[0], atol=1e-6)


def test_bipartite_merges_the_most_similar_pairs_per_sequence():
    # A-tokens at positions 0, 2, 4; B-tokens at 1, 3, 5. Sequence 2 is padded after 4 tokens.
    scores = torch.tensor([[[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.3, 0.1, 0.05]]]).repeat(2, 1, 1)
    tokens = state([[1] * 6, [1, 1, 1, 1, 0, 0]])
    dest = bipartite_merge(scores, tokens, torch.tensor([2, 5])).dest[..., 0]
    assert dest[0].tolist() == [1, 1, 3, 3, 4, 5]  # the two best edges; position 4 (0.3) stays
    assert dest[1].tolist() == [1, 1, 3, 3, 4, 5]  # capped by its two real A-tokens
    # protected tokens (0 and 3) neither merge nor receive
    tokens = state([[1] * 6], protected=[[True, False, False, True, False, False]])
    dest = bipartite_merge(scores[:1], tokens, torch.tensor([3])).dest[0, :, 0]
    assert dest.tolist() == [0, 1, 1, 3, 1, 5]
