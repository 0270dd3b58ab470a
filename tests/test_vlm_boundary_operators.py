"""The boundary operators VisionZip, VTC-CLS and ToDRE on synthetic tower outputs: the count each image
keeps, padding, keep 1.0, and each one's defining rule on small hand-made cases."""

import math

import pytest
import torch

from tokenfuse.core import Tokens, reduce
from tokenfuse.methods import VisualInput, make

OPERATORS = ["visionzip", "vtc-cls", "todre"]
LAYERS = 9  # tower layers up to the selected one


def boundary_input(x, real, keep, track_source=False, **fields):
    """VisualInput for images of `real` patch tokens each, padded to x.shape[1]; keep: (B,) counts."""
    n = x.shape[1]
    mask = torch.tensor([[i < r for i in range(n)] for r in real])
    tokens = Tokens.start(mask, torch.zeros_like(mask), track_source=track_source)
    return VisualInput(x=x, tokens=tokens, visual=mask, keep=torch.as_tensor(keep), **fields)


def random_input(real, n, fraction, op, seed=0, track_source=False):
    """Random features, keys and [CLS] attention; padding filled with large values that must not leak."""
    gen = torch.Generator().manual_seed(seed)
    b = len(real)
    x = torch.randn(b, n, 6, generator=gen)
    keys = torch.randn(b, n, 5, generator=gen)
    layers = torch.rand(b, LAYERS, n, generator=gen)
    pad = torch.arange(n)[None, :] >= torch.tensor(real)[:, None]
    x[pad], keys[pad] = 1e3, 1e3
    layers = layers.masked_fill(pad[:, None, :], 1e3)
    keep = op.counts(torch.tensor(real), fraction)
    return boundary_input(
        x,
        real,
        keep,
        track_source,
        cls_attention=layers[:, -1],
        cls_attention_layers=layers,
        keys=keys,
    )


def run(op, inp):
    return reduce(inp.x, inp.tokens, op.decide(inp))


@pytest.mark.parametrize("name", OPERATORS)
@pytest.mark.parametrize("fraction", [64 / 576, 0.25, 0.5, 0.9])
def test_each_image_keeps_exactly_its_count(name, fraction):
    op = make(name, kind="visual", keep=fraction)
    inp = random_input([40, 23, 1], 40, fraction, op)
    _, tokens = run(op, inp)
    assert tokens.count.tolist() == inp.keep.tolist()


@pytest.mark.parametrize("name", OPERATORS)
def test_an_image_is_reduced_alike_alone_and_in_a_padded_batch(name):
    op = make(name, kind="visual", keep=0.3)
    batch = random_input([30, 17], 30, 0.3, op, seed=1)
    out, tokens = run(op, batch)
    for b, real in enumerate([30, 17]):
        alone = boundary_input(
            batch.x[b : b + 1, :real],
            [real],
            batch.keep[b : b + 1],
            cls_attention=batch.cls_attention[b : b + 1, :real],
            cls_attention_layers=batch.cls_attention_layers[b : b + 1, :, :real],
            keys=batch.keys[b : b + 1, :real],
        )
        out_alone, tokens_alone = run(op, alone)
        k = int(batch.keep[b])
        torch.testing.assert_close(out[b, :k], out_alone[0, :k])
        assert tokens.size[b, :k].tolist() == tokens_alone.size[0, :k].tolist()


@pytest.mark.parametrize("name", OPERATORS)
def test_keep_one_keeps_every_token_unchanged(name):
    op = make(name, kind="visual", keep=1.0)
    inp = random_input([24, 11], 24, 1.0, op, seed=2)
    out, tokens = run(op, inp)
    assert torch.equal(out[0], inp.x[0]) and torch.equal(out[1, :11], inp.x[1, :11])
    assert torch.equal(tokens.size, inp.tokens.size)


def kept_sources(tokens):
    """Per survivor of row 0, the original tokens it holds: list of sorted index lists."""
    source = tokens.source[0]
    return [torch.nonzero(row > 0).flatten().tolist() for row in source[tokens.mask[0]]]


def test_visionzip_keeps_the_top_cls_tokens_verbatim_and_merges_the_rest_into_contextual_ones():
    op = make("visionzip", kind="visual", keep=64 / 576)
    inp = random_input([576], 576, 64 / 576, op, seed=3, track_source=True)
    out, tokens = run(op, inp)
    held = kept_sources(tokens)
    dominant = set(inp.cls_attention[0].topk(54).indices.tolist())
    alone = [s[0] for s in held if len(s) == 1]
    assert dominant <= set(alone)  # the 54 of highest [CLS] attention, each on its own
    for position, s in enumerate(held):
        if s[0] in dominant:
            assert torch.equal(out[0, position], inp.x[0, s[0]])
    contextual = [s for s in held if s[0] not in dominant]
    assert len(contextual) == 10  # the paper's 54 + 10 for 64
    assert sorted(i for s in contextual for i in s) == sorted(set(range(576)) - dominant)
    assert tokens.size.sum() == 576  # every token's mass is in some kept token


def tiny_visionzip_input(track_source=False):
    """8 patches: [CLS] attention picks 1 and 5; the rest 0 2 3 4 6 7 give targets 0 and 4 (every third
    of six, for 2 contextual); keys send 3 and 6 to target 0, 2 and 7 to target 4 by cosine (a dot
    product would send 3 to the long key of target 4)."""
    cls = torch.tensor([[0.1, 0.9, 0.2, 0.1, 0.3, 0.8, 0.2, 0.1]])
    keys = torch.tensor([[[1, 0], [1, 0], [0, 1], [1, 0.3], [0, 5], [1, 0], [1, 0], [0, 1]]])
    x = torch.arange(8.0)[None, :, None].expand(1, 8, 3).clone()
    return boundary_input(x, [8], [4], track_source, cls_attention=cls, keys=keys)


def test_visionzip_hand_example():
    op = make("visionzip", kind="visual", keep=0.5, contextual=0.5)
    inp = tiny_visionzip_input()
    dest = op.decide(inp).dest[0, :, 0].tolist()
    assert dest == [0, 1, 4, 0, 4, 5, 0, 4]
    out, tokens = run(op, inp)
    # engine: target and merged tokens averaged by size (the reference: target + mean of merged)
    assert out[0, :, 0].tolist() == pytest.approx([(0 + 3 + 6) / 3, 1.0, (2 + 4 + 7) / 3, 5.0])
    assert tokens.size[0].tolist() == [3.0, 1.0, 3.0, 1.0]


def test_visionzip_reference_order_puts_dominant_tokens_first():
    op = make("visionzip", kind="visual", keep=0.5, contextual=0.5, order="reference")
    out, _ = run(op, tiny_visionzip_input())
    assert out[0, :, 0].tolist() == pytest.approx([1.0, 5.0, (0 + 3 + 6) / 3, (2 + 4 + 7) / 3])


def test_visionzip_without_contextual_tokens_prunes_by_cls_attention():
    op = make("visionzip", kind="visual", keep=0.5, contextual=0.0)
    dest = op.decide(tiny_visionzip_input()).dest[0, :, 0].tolist()
    assert dest == [-1, 1, 2, -1, 4, 5, -1, -1]  # the four of highest [CLS] attention


@pytest.mark.parametrize("start_layer", [0, 4, -7, -1])
def test_vtc_cls_keeps_the_top_of_the_layer_averaged_cls_attention(start_layer):
    op = make("vtc-cls", kind="visual", keep=0.25, start_layer=start_layer)
    inp = random_input([48], 48, 0.25, op, seed=4, track_source=True)
    _, tokens = run(op, inp)
    score = inp.cls_attention_layers[0, start_layer:].mean(0)
    expected = sorted(score.topk(12).indices.tolist())
    assert [s for (s,) in kept_sources(tokens)] == expected


def test_vtc_cls_hand_example():
    # means over layers 0-2: 0.33 0.13 0.23 0.30; over layers 1-2: 0.05 0.15 0.35 0.45
    layers = torch.tensor([[[0.9, 0.1, 0.0, 0.0], [0.0, 0.2, 0.5, 0.3], [0.1, 0.1, 0.2, 0.6]]])
    x = torch.randn(1, 4, 3)
    inp = boundary_input(x, [4], [2], cls_attention_layers=layers)
    kept = {
        start: make("vtc-cls", kind="visual", keep=0.5, start_layer=start).decide(inp) for start in (0, 1)
    }
    assert kept[0].dest[0, :, 0].tolist() == [0, -1, -1, 3]
    assert kept[1].dest[0, :, 0].tolist() == [-1, -1, 2, 3]


def test_vtc_cls_rejects_a_start_layer_outside_the_tower():
    op = make("vtc-cls", kind="visual", start_layer=LAYERS)
    inp = random_input([8], 8, 0.25, op)
    with pytest.raises(ValueError, match="start_layer 9 is outside"):
        op.decide(inp)
    with pytest.raises(ValueError, match="start_layer must be a whole number"):
        make("vtc-cls", kind="visual", start_layer=True)


def test_visionzip_rejects_a_contextual_share_outside_zero_one():
    with pytest.raises(ValueError, match=r"contextual must be a number in \[0, 1\]"):
        make("visionzip", kind="visual", contextual=1.5)


def test_todre_picks_one_token_per_cluster_before_a_second_from_any():
    gen = torch.Generator().manual_seed(5)
    centres = torch.eye(6)[:4] * 3
    cluster = torch.arange(20) % 4
    x = (centres[cluster] + 0.2 * torch.randn(20, 6, generator=gen))[None]
    cls = torch.rand(1, 20, generator=gen)
    previous = torch.zeros(20, dtype=torch.bool)
    for k in (1, 2, 3, 4):
        inp = boundary_input(x, [20], [k], cls_attention=cls)
        kept = make("todre", kind="visual").decide(inp).dest[0, :, 0] >= 0
        assert kept[cls.argmax()]  # the pivot
        assert (kept >= previous).all()  # greedy: each count adds to the last one's picks
        assert torch.bincount(cluster[kept], minlength=4).max() == 1
        previous = kept


def test_todre_hand_example():
    # 2-D directions (degrees) at different lengths: cosine distance ignores the length
    angles = [10.0, 100.0, 0.0, 200.0, 180.0, 270.0]
    lengths = [1.0, 5.0, 2.0, 0.5, 3.0, 1.0]
    x = torch.tensor(
        [
            [r * math.cos(math.radians(a)), r * math.sin(math.radians(a))]
            for a, r in zip(angles, lengths, strict=True)
        ]
    )
    cls = torch.tensor([[0.1, 0.1, 0.5, 0.1, 0.1, 0.1]])  # pivot: token 2 (0 degrees)
    picks = {}
    for k in (1, 2, 3, 4):
        inp = boundary_input(x[None], [6], [k], cls_attention=cls)
        picks[k] = (
            torch.nonzero(make("todre", kind="visual").decide(inp).dest[0, :, 0] >= 0).flatten().tolist()
        )
    # 0 deg, then 180 (opposite), then 270 (distance 1 to both), then 100 (0.83 from 180, more than 10 or 200)
    assert picks == {1: [2], 2: [2, 4], 3: [2, 4, 5], 4: [1, 2, 4, 5]}
