"""ATS: inverse transform sampling of [CLS]-attention x value-norm significance, per input."""

import pytest
import torch

from tokenfuse.core import Tokens
from tokenfuse.methods import LayerInput, make

D = 4


def layer_input(logits, norms=None, remove=None, real=None, protected_ids=()):
    """One attention head whose [CLS] query gives token j the logit logits[b][j], and values of
    norm norms[b][j]. Position 0 ([CLS]) and each sequence's last real token ([SEP]) are protected."""
    logits = torch.tensor(logits, dtype=torch.float32)
    B, N = logits.shape
    norms = torch.ones(B, N) if norms is None else torch.tensor(norms, dtype=torch.float32)
    real = real or [N] * B
    positions = torch.arange(N)[None]
    mask = positions < torch.tensor(real)[:, None]
    protected = (positions == 0) | (positions == torch.tensor(real)[:, None] - 1)
    for i in protected_ids:
        protected[:, i] = True
    q = torch.zeros(B, 1, N, D)
    q[..., 0] = D**0.5  # logit of key j = its first coordinate
    k = torch.zeros(B, 1, N, D)
    k[:, 0, :, 0] = logits
    v = torch.zeros(B, 1, N, D)
    v[:, 0, :, 1] = norms
    remove = torch.tensor(remove if remove is not None else [N // 2] * B)
    tokens = Tokens.start(mask, protected)
    return LayerInput(point=1, x=torch.randn(B, N, 8), tokens=tokens, remove=remove, q=q, k=k, v=v)


def kept(inp):
    dest = make("ats").decide(inp).dest[..., 0]
    own = torch.arange(dest.shape[1])
    return [
        set((dest[b] == own).nonzero()[:, 0].tolist()) & set(range(int(inp.tokens.count[b])))
        for b in range(len(dest))
    ]


def test_concentrated_attention_keeps_fewer_tokens_than_flat_in_one_batch():
    # 10 tokens: [CLS], 8 candidates, [SEP]; the first sequence's [CLS] looks at tokens 2 and 5 only
    concentrated = [0.0] * 10
    concentrated[2] = concentrated[5] = 12.0
    flat = [0.0] * 10
    got = kept(layer_input([concentrated, flat], remove=[4, 4]))  # K = 10 - 4 - 2 = 4 samples
    assert len(got[1]) == 6  # flat: the 4 samples hit 4 different tokens, plus [CLS] and [SEP]
    assert {0, 2, 5, 9} <= got[0] and len(got[0]) < len(got[1])


def test_kept_tokens_are_the_significant_ones():
    torch.manual_seed(0)
    logits = torch.randn(1, 14) * 2
    inp = layer_input(logits.tolist(), remove=[7])
    got = kept(inp)[0]
    k = 14 - 2 - 7
    score = (inp.cls_attention() * inp.value_norms())[0, 1:13]
    score = score / score.sum()
    significant = {i + 1 for i in range(12) if score[i] >= 1 / k}
    assert significant and significant <= got  # a token holding >= 1/K of the mass is always hit
    # the candidates kept outweigh the same number of the least significant ones by far
    mass = sum(score[i - 1] for i in got - {0, 13})
    assert mass > 0.8 and mass > 3 * score.sort().values[: len(got) - 2].sum()


def test_matches_the_papers_sampling_rule():
    """CDF of the sorted scores sampled at r = 1/2K, 3/2K, ...; each r takes the token of nearest
    CDF value; a token sampled twice counts once. Checked against a plain loop, in padded batches."""
    torch.manual_seed(1)
    for _ in range(20):
        real = [12, 9, 5]
        logits = (torch.randn(3, 12) * 2).tolist()
        norms = (torch.rand(3, 12) + 0.5).tolist()
        remove = [int(torch.randint(1, r - 2, ())) for r in real]
        inp = layer_input(logits, norms, remove=remove, real=real)
        score = inp.cls_attention() * inp.value_norms()
        for b, got in enumerate(kept(inp)):
            cand = list(range(1, real[b] - 1))
            k = len(cand) - remove[b]
            s = score[b, cand] / score[b, cand].sum()
            order = sorted(range(len(cand)), key=lambda j: (s[j].item(), j))
            cdf = s[order].cumsum(0)
            expected = {cand[order[int((cdf - (2 * i + 1) / (2 * k)).abs().argmin())]] for i in range(k)}
            assert got == expected | {0, real[b] - 1}
            assert len(got) <= real[b] - remove[b]  # never more than the budget allows


def test_value_norms_decide_when_attention_is_equal():
    flat = [[0.0] * 10] * 2
    norms = [[1.0] * 10, [1.0] * 10]
    norms[0][3] = norms[0][6] = 10.0
    norms[1][1] = norms[1][4] = 10.0
    first, second = kept(layer_input(flat, norms, remove=[5, 5]))  # K = 3
    assert {3, 6} <= first and {1, 4} <= second
    assert 3 not in second and 4 not in first and len(first) == len(second) == 5


def test_same_decision_alone_and_in_a_padded_batch_and_nothing_asked_keeps_all():
    torch.manual_seed(2)
    logits = (torch.randn(2, 12) * 2).tolist()
    together = kept(layer_input(logits, remove=[5, 3], real=[12, 7]))  # the second padded by 5
    alone = kept(layer_input([logits[1][:7]], remove=[3]))
    assert together[1] == alone[0] and len(alone[0]) < 7
    untouched = kept(layer_input(logits, remove=[5, 0], real=[12, 7]))
    assert untouched[1] == set(range(7))  # remove 0: untouched although its neighbour is reduced


def test_protected_tokens_are_never_dropped():
    logits = [[-20.0] * 10]  # the [CLS] looks at nobody else; token 4 is protected by the caller
    logits[0][0] = 20.0
    got = kept(layer_input(logits, remove=[5], protected_ids=[4]))[0]
    assert {0, 4, 9} <= got and len(got) <= 10 - 5


def test_declares_attention_inputs_and_unknown_options_fail():
    method = make("ats")
    assert method.prunes and method.adaptive
    assert method.needs == {"cls_attention", "values"}
    assert method.schedule_for(4)[0] == 1.0  # nothing to score at the embeddings
    with pytest.raises(TypeError, match="ats"):
        make("ats", temperature=2.0)
