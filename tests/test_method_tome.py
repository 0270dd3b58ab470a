"""ToMe's reference layout (order="reference") and the engine's survivor order key it rests on.

tests/test_tome_reference_timm.py checks the whole method against the reference code's logits."""

import pytest
import torch
from conftest import MODELS, PREFIX, VISION, images, vision_outputs

import tokenfuse
from tokenfuse.core import Reduction, Tokens, reduce
from tokenfuse.core.matching import bipartite_merge
from tokenfuse.methods.tome import ToMe


def test_reduce_lays_survivors_out_by_the_order_key():
    """Survivors sorted by key, ties in current order; sizes, protection and sources move with them,
    and a padded sequence lays out as it would alone."""
    x = torch.eye(5).expand(2, 5, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]).bool()
    tokens = Tokens.start(mask, torch.tensor([[1, 0, 0, 0, 0]] * 2).bool(), track_source=True)
    dest = torch.tensor([[0, 1, 2, 1, 4]] * 2)  # token 3 merges into token 1
    order = torch.tensor([[0, 9, 3, 7, 3]] * 2)
    out, t = reduce(x, tokens, Reduction.hard(dest, order))
    e = torch.eye(5)
    assert torch.equal(out[0], torch.stack([e[0], e[2], e[4], (e[1] + e[3]) / 2]))
    assert torch.equal(out[1, :3], torch.stack([e[0], e[2], (e[1] + e[3]) / 2]))
    assert t.size.tolist() == [[1, 1, 1, 2], [1, 1, 2, 0]]
    assert t.protected.tolist() == [[True, False, False, False]] * 2
    assert torch.equal(t.source[0], out[0] * t.size[0, :, None])
    same, _ = reduce(x, tokens, Reduction.hard(dest))  # no key: current order
    assert torch.equal(same[0], torch.stack([e[0], (e[1] + e[3]) / 2, e[2], e[4]]))


def test_reduce_refuses_an_order_of_the_wrong_shape():
    tokens = Tokens.start(torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool))
    red = Reduction.hard(torch.tensor([[0, 1, 1, 3]]), torch.arange(3)[None])
    with pytest.raises(ValueError, match=r"one key per token, \(1, 4\), got \(1, 3\)"):
        reduce(torch.randn(1, 4, 2), tokens, red)


def layout(protected: list[int], scores: torch.Tensor, order: str) -> list[list[int]]:
    """Which original tokens each position holds after one ToMe merge of 2 of 9 tokens."""
    N = 9
    prot = torch.zeros(1, N, dtype=torch.bool)
    prot[0, protected] = True
    tokens = Tokens.start(torch.ones(1, N, dtype=torch.bool), prot)
    red = bipartite_merge(scores[None], tokens, torch.tensor([2]), order)
    out, _ = reduce(torch.eye(N)[None], tokens, red)
    return [row.nonzero().flatten().tolist() for row in out[0]]


# A-tokens are positions 0, 2, 4, 6, 8 (rows), B-tokens 1, 3, 5, 7 (columns)
SCORES = torch.full((5, 4), -1.0)
SCORES[2, 0] = 0.9  # 4 -> 1, the best edge
SCORES[1, 3] = 0.8  # 2 -> 7
SCORES[0, 2] = 0.5  # 0 -> 5, third: unmerged
SCORES[4, 2] = 0.3  # 8 -> 5
SCORES[3, 2] = 0.1  # 6 -> 5


def test_reference_layout_after_a_merge():
    """[CLS] first, then unmerged A-tokens, then B-tokens, then the trailing [SEP]; a protected token
    amid the others stays in its group."""
    text = layout([0, 3, 8], SCORES, "reference")
    assert text == [[0], [6], [1, 4], [3], [5], [2, 7], [8]]
    assert layout([0, 3, 8], SCORES, "original") == [[0], [1, 4], [3], [5], [6], [2, 7], [8]]
    # with no protected token the reference code leaves the unmerged A-tokens in score order
    assert layout([], SCORES, "reference") == [[0], [8], [6], [1, 4], [3], [5], [2, 7]]


def test_order_is_checked_and_recorded():
    with pytest.raises(
        ValueError, match=r"tome: order must be one of 'original' \| 'reference' \(.*\), got 'ref'"
    ):
        ToMe(order="ref")
    assert ToMe(order="reference").options()["order"] == "reference"


def test_reference_order_on_text_keeps_the_contracts(tokenizer, texts):
    """Padding invariance, [CLS] first, [SEP] last, a protected id kept, sizes conserved; and the
    layout does change what the next layers merge."""
    fox = tokenizer.convert_tokens_to_ids("fox")
    model = tokenfuse.apply(MODELS["bert"](), "tome", keep=0.4, order="reference", protect_ids=[fox])
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        model(**inputs)
    tokens = tokenfuse.last_tokens(model)
    assert torch.equal(tokens.size.sum(-1), inputs["attention_mask"].sum(-1).float())
    assert torch.all(tokens.protected[:, 0]) and tokens.protected[0].sum() == 3
    assert torch.all(tokens.protected.gather(1, (tokens.count - 1)[:, None]))
    together = tokenfuse.embed(model, tokenizer, texts, batch_size=len(texts))
    for i, text in enumerate(texts):
        alone = tokenfuse.embed(model, tokenizer, [text])
        assert torch.allclose(alone[0], together[i], atol=1e-5), i
    original = tokenfuse.embed(tokenfuse.apply(model, "tome", keep=0.4, protect_ids=[fox]), tokenizer, texts)
    assert not torch.allclose(original, together, atol=1e-4)


@pytest.mark.parametrize("family", ["hf-deit", "hf-dinov2-registers"])
def test_reference_order_keeps_prefix_tokens_in_front(family):
    """[CLS], distillation and register tokens stay at the front, where the heads read them."""
    model = tokenfuse.apply(VISION[family](), "tome", keep=0.4, order="reference")
    pixels = images()
    together = vision_outputs(model, pixels)[0]
    tokens, prefix = tokenfuse.last_tokens(model), PREFIX[family]
    assert torch.all(tokens.protected[:, :prefix]) and tokens.protected.sum() == prefix * len(pixels)
    for i in range(len(pixels)):
        alone = vision_outputs(model, pixels[i : i + 1])[0]
        assert torch.allclose(alone[0, :prefix], together[i, :prefix], atol=1e-5), i
