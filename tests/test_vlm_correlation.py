"""Token-level correlation-guided compression (`tcc`): a view's share of its image's budget follows its
non-repeated patches, the shares sum to the budget exactly, and within a view the tokens of highest
[CLS] attention are kept (the least repeated ones where the tower has no [CLS]); on tiny LLaVA-NeXT and
LLaVA-OneVision models it generates on a batch of differently sized images, each row as alone, a crop
of one colour getting less than a crop of noise; an image of one view keeps its top tokens by [CLS]
attention (LLaVA-1.5); a Qwen-VL tower, which exposes no keys, is refused with the reason."""

from __future__ import annotations

import pytest
import torch
from test_anyres import IMAGE, SIZES, batch_of, packed, prompts, tiny_anyres
from test_llava import generate, rows_to_batch, tiny_llava
from test_llava import prompts as llava_prompts
from test_qwen_vl import tiny_qwen

import tokenfuse
from tokenfuse.core import Tokens
from tokenfuse.methods import VisualInput
from tokenfuse.methods.vlm.tcc import TokenCorrelation


def view_input(keys: torch.Tensor, views: torch.Tensor, keep, cls: torch.Tensor | None) -> VisualInput:
    visual = views >= 0
    tokens = Tokens.start(visual, torch.zeros_like(visual))
    keep = torch.as_tensor(keep).reshape(-1)
    return VisualInput(
        x=keys, tokens=tokens, visual=visual, keep=keep, cls_attention=cls, keys=keys, views=views
    )


def kept(inp: VisualInput, **options) -> torch.Tensor:
    """(B, N) the visual tokens the operator keeps."""
    return (TokenCorrelation(**options).decide(inp).dest[..., 0] >= 0) & inp.visual


def repeated(n: int, patterns: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """(n, dim) keys cycling through `patterns` random ones, with a little noise: every one repeats."""
    base = torch.randn(patterns, dim, generator=gen)
    return base[torch.arange(n) % patterns] + 1e-3 * torch.randn(n, dim, generator=gen)


def test_a_crop_of_repeated_patterns_gets_a_smaller_share_than_a_varied_one():
    """Views of 16 tokens: base and crop 2 varied (16 non-repeated patches each), crop 1 half repeated
    (8): a budget of 12 is shared 16 : 8 : 16 by the divisor rule, 5 + 2 + 5."""
    gen = torch.Generator().manual_seed(0)
    half = torch.cat([repeated(8, 2, 64, gen), torch.randn(8, 64, generator=gen)])
    keys = torch.cat([torch.randn(16, 64, generator=gen), half, torch.randn(16, 64, generator=gen)])[None]
    views = torch.arange(3).repeat_interleave(16)[None]
    chosen = kept(view_input(keys, views, 12, torch.rand(1, 48, generator=gen)))
    assert [int(chosen[0, views[0] == v].sum()) for v in range(3)] == [5, 2, 5]


@pytest.mark.parametrize("seed", range(6))
def test_the_views_counts_sum_to_the_images_budget_and_none_exceeds_its_view(seed):
    """Views of unequal sizes (crops cut by the unpadding), some all repeated, rows padded: each row
    keeps its budget exactly, every keep from 1 to all, no view more than it has."""
    gen = torch.Generator().manual_seed(seed)
    rows, sizes = [], []
    for _ in range(3):
        size = torch.randint(1, 12, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen)
        parts = [
            repeated(int(n), 1, 16, gen) if bool(torch.rand(1, generator=gen) < 0.4) else torch.randn(n, 16)
            for n in size.tolist()
        ]
        rows.append(torch.cat(parts))
        sizes.append(size)
    keys = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    views = torch.nn.utils.rnn.pad_sequence(
        [torch.arange(len(s)).repeat_interleave(s) for s in sizes], batch_first=True, padding_value=-1
    )
    views = torch.where(
        torch.arange(keys.shape[1])[None] < torch.tensor([len(r) for r in rows])[:, None], views, -1
    )
    total = (views >= 0).sum(1)
    for fraction in (1 / total.max(), 0.1, 0.25, 0.5, 0.9, 1.0):
        keep = torch.ceil(total * fraction).long().clamp(1)
        chosen = kept(view_input(keys, views, keep, torch.rand(*views.shape, generator=gen)))
        assert chosen.sum(1).tolist() == keep.tolist()
        for r, size in enumerate(sizes):
            got = torch.stack([chosen[r, views[r] == v].sum() for v in range(len(size))])
            assert bool((got <= size).all())


def test_within_a_view_the_tokens_of_highest_cls_attention_are_kept():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 40, 32, generator=gen)
    views = torch.tensor([0] * 16 + [1] * 10 + [2] * 14)[None]
    cls = torch.rand(1, 40, generator=gen)
    chosen = kept(view_input(keys, views, 10, cls))
    for v in range(3):
        mine = views[0] == v
        count = int(chosen[0, mine].sum())
        top = cls[0].masked_fill(~mine, -1).topk(count).indices
        assert sorted(top.tolist()) == chosen[0].nonzero()[:, 0][views[0, chosen[0]] == v].tolist()


def test_without_cls_the_least_repeated_tokens_of_a_view_are_kept():
    """No [CLS] (SigLIP): 14 tokens of one pattern and 2 distinct ones; keeping 2 keeps the distinct."""
    gen = torch.Generator().manual_seed(2)
    keys = repeated(16, 1, 32, gen)
    keys[[3, 11]] = torch.randn(2, 32, generator=gen)
    chosen = kept(view_input(keys[None], torch.zeros(1, 16, dtype=torch.long), 2, None))
    assert chosen[0].nonzero()[:, 0].tolist() == [3, 11]


def test_a_row_decides_alone_what_it_decides_in_a_padded_batch():
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 30, 16, generator=gen)
    keys[0, :12] = repeated(12, 2, 16, gen)
    views = torch.tensor([[0] * 10 + [1] * 10 + [2] * 10, [0] * 10 + [1] * 8 + [-1] * 12])
    cls = torch.rand(2, 30, generator=gen)
    both = kept(view_input(keys, views, [8, 5], cls))
    assert torch.equal(both[1:, :18], kept(view_input(keys[1:, :18], views[1:, :18], [5], cls[1:, :18])))
    assert torch.equal(both[:1], kept(view_input(keys[:1], views[:1], [8], cls[:1])))


def test_threshold_is_a_cosine_similarity():
    with pytest.raises(ValueError, match=r"threshold must be .*\[-1, 1\].*got 2"):
        TokenCorrelation(threshold=2)


@pytest.mark.parametrize("name", ["next", "onevision"])
def test_generate_at_a_quarter_on_differently_sized_images_each_row_as_alone(name):
    """LLaVA-NeXT ([CLS] attention) and OneVision (SigLIP: the substitute): generate() at keep 0.25 on
    a left-padded batch of images of different sizes and crop grids; each image keeps its budget,
    ceil(0.25 x content tokens); each row's logits (1e-4) and tokens are its own alone."""
    model = tiny_anyres(name)
    rows, images = prompts(model)
    batch = batch_of(rows, images)
    host = packed(model, images["pixel_values"], SIZES)
    content = [int((f != model.model.image_newline.to(f)).any(-1).sum()) for f in host]
    tokenfuse.apply(model, "tcc", keep=0.25)
    try:
        with torch.no_grad():
            logits = model(**batch).logits
        assert [len(k) for k in tokenfuse.kept(model)] == [-(-c // 4) for c in content]
        together = generate(model, batch)
        for i in range(len(rows)):
            alone = batch_of(rows, images, at=i)
            with torch.no_grad():
                one = model(**alone).logits[0]
            torch.testing.assert_close(logits[i, -len(one) :], one, atol=1e-4, rtol=1e-4)
            own = generate(model, alone)[0]
            assert torch.equal(own, together[i, : len(own)]) and not bool(together[i, len(own) :].any())
    finally:
        tokenfuse.remove(model)


class Recording(TokenCorrelation):
    def decide(self, inp):
        red = super().decide(inp)
        self.seen = inp.views, red.dest[..., 0] >= 0
        return red


@pytest.mark.parametrize("name", ["next", "onevision"])
def test_in_the_model_a_crop_of_one_colour_gets_less_than_a_crop_of_noise(name):
    """A square image, 2 x 2 crops: crops 1 and 4 one colour each, 2 and 3 noise. The adapter's views
    follow the host's layout (OneVision: its downsampled 5 x 5 crop grid), and each one-colour crop
    keeps a smaller share of its tokens than each noise crop."""
    model = tiny_anyres(name)
    pixels = torch.randn(1, 5, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    pixels[0, 1], pixels[0, 4] = 0.5, -0.3
    sizes = torch.tensor([[40, 40]])
    n = len(packed(model, pixels, sizes)[0])
    batch = rows_to_batch([[1] + [IMAGE] * n + [5, 6, 7]], None) | {
        "pixel_values": pixels,
        "image_sizes": sizes,
    }
    operator = Recording(keep=0.25)
    tokenfuse.apply(model, operator)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        tokenfuse.remove(model)
    views, chosen = operator.seen
    size = torch.stack([(views[0] == v).sum() for v in range(5)])
    assert size.tolist() == ([16] * 5 if name == "next" else [16, 4, 6, 6, 9])  # OneVision: 8 x 8 -> 5 x 5
    share = torch.stack([chosen[0, views[0] == v].sum() for v in range(5)]) / size
    assert max(share[1], share[4]) < min(share[2], share[3])
    assert int(chosen.sum()) == -(-int(size.sum()) // 4)


def test_an_image_of_one_view_keeps_its_top_tokens_by_cls_attention():
    """LLaVA-1.5 (one view per image): the single-view case, the tokens VTC-CLS keeps at the selected
    layer alone."""
    model = tiny_llava(tower="clip")
    batch = rows_to_batch(*llava_prompts())
    picked = []
    for method, options in (("tcc", {}), ("vtc-cls", dict(start_layer=-1))):
        tokenfuse.apply(model, method, keep=0.25, **options)
        try:
            with torch.no_grad():
                model(**batch)
            picked.append([k.tolist() for k in tokenfuse.kept(model)])
        finally:
            tokenfuse.remove(model)
    assert picked[0] == picked[1]


def test_a_qwen_tower_is_refused_naming_the_keys_and_the_way_out():
    model = tiny_qwen("qwen2-vl")
    with pytest.raises(ValueError, match=r"tcc reads the tower's keys.*does not expose.*divprune"):
        tokenfuse.apply(model, "tcc", keep=0.25)
    assert tokenfuse.patch_of(model) is None
