"""LLaVA-NeXT and LLaVA-OneVision (AnyRes: a base view plus unpadded crops, a newline per row) on tiny
random models: identical at keep 1.0, every operator that runs does so on a batch of images of
different sizes and aspect ratios with each row what it is alone, the budget holding for the whole
image (base view plus crops; newlines kept on top), the newlines where that choice puts them, and
clear refusals of what an AnyRes image cannot take (pool, resize, a tower method, OneVision videos)."""

from __future__ import annotations

import pytest
import torch
from test_llava import generate, rows_to_batch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    SiglipVisionConfig,
)

import tokenfuse

IMAGE, VIDEO = 64, 65
PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]  # crops of 28 px: 1x2, 2x1, 2x2, 1x3, 3x1
#: (height, width) of the caller's images: wide, tall, square (OneVision downsamples its 8 x 8 crop grid)
SIZES = torch.tensor([[30, 50], [60, 20], [40, 40]])
BOUNDARY = {
    "next": ["random", "divprune", "cdpruner", "visionzip", "recoverable", "todre", "aim", "vtc-cls"],
    "onevision": ["random", "divprune", "cdpruner", "aim"],  # SigLIP: no [CLS] to score by
}
OPTIONS = {"vtc-cls": dict(start_layer=-2)}
IN_LLM = {"fastv": {}, "sparsevlm": dict(layers=(1, 2, 3)), "aim-prune": dict(layer=1, end=3)}


def tiny_anyres(family: str, attn: str = "sdpa"):
    """LLaVA-NeXT's layout (CLIP tower, its penultimate layer, [CLS] dropped) or OneVision's (SigLIP,
    last layer, every token; anyres_max_2 so that a 2 x 2 crop grid is downsampled)."""
    torch.manual_seed(0)
    sizes = dict(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=3, num_attention_heads=2)
    text = LlamaConfig(
        vocab_size=66, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    common = dict(text_config=text.to_dict(), image_token_index=IMAGE, image_grid_pinpoints=PINPOINTS)
    if family == "next":
        vision = CLIPVisionConfig(**sizes, intermediate_size=64)
        config = LlavaNextConfig(
            vision_config=vision.to_dict(), **common, vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )  # fmt: skip
        model = LlavaNextForConditionalGeneration
    else:
        vision = SiglipVisionConfig(**sizes, intermediate_size=64)
        config = LlavaOnevisionConfig(
            vision_config=vision.to_dict(), **common, video_token_index=VIDEO, vision_feature_layer=-1,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2",
        )  # fmt: skip
        model = LlavaOnevisionForConditionalGeneration
    config._attn_implementation = attn
    return model(config).eval()


def packed(model, pixels: torch.Tensor, sizes: torch.Tensor) -> list[torch.Tensor]:
    """The unpatched host's packed features of each image (base view, unpadded crops, newlines)."""
    with torch.no_grad():
        return model.model.get_image_features(
            pixels, sizes, vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output  # fmt: skip


def newlines(model, features: torch.Tensor) -> torch.Tensor:
    """(N,) which of an image's packed features are the newline token."""
    return (features == model.model.image_newline.to(features)).all(-1)


def prompts(model, seed: int = 1) -> tuple[list[list[int]], dict]:
    """Rows of [bos, the image's placeholders (as many as the host packs), question], one image each,
    of different sizes, aspect ratios and crop counts; and the images' inputs."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(SIZES), 5, 3, 28, 28, generator=gen)  # up to base + 4 crops, padded
    lengths = [len(f) for f in packed(model, pixels, SIZES)]
    rows = [
        [1] + [IMAGE] * n + torch.randint(3, IMAGE, (2 + i,), generator=gen).tolist()
        for i, n in enumerate(lengths)
    ]
    return rows, {"pixel_values": pixels, "image_sizes": SIZES}


def batch_of(rows, images, at=None, left: bool = True) -> dict:
    if at is not None:
        rows, images = [rows[at]], {k: v[at : at + 1] for k, v in images.items()}
    return rows_to_batch(rows, None, left=left) | images


@pytest.fixture(scope="module", params=["next", "onevision"])
def model(request):
    return tiny_anyres(request.param)


def family(model) -> str:
    return "next" if isinstance(model, LlavaNextForConditionalGeneration) else "onevision"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["next", "onevision"])
def test_keep_one_is_bit_identical_for_forward_and_generate(name, attn):
    model = tiny_anyres(name, attn)
    rows, images = prompts(model)
    batch = batch_of(rows, images)
    with torch.no_grad():
        logits, tokens = model(**batch).logits, generate(model, batch)
    for method in [*BOUNDARY[name], *IN_LLM]:
        tokenfuse.apply(model, method, keep=1.0, **OPTIONS.get(method, IN_LLM.get(method, {})))
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, logits), method
        assert torch.equal(generate(model, batch), tokens), method
    tokenfuse.remove(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits)


@pytest.mark.parametrize("method", sorted({*BOUNDARY["next"], *IN_LLM}))
def test_each_row_of_a_batch_of_different_images_is_what_it_is_alone(model, method):
    """Images of different sizes and aspect ratios, so of different crop grids and placeholder counts,
    in one left-padded batch: each row's logits (1e-4) and generated tokens equal the row's alone."""
    if method not in BOUNDARY[family(model)] and method not in IN_LLM:
        pytest.skip("scores by [CLS] attention: refused on SigLIP (tests/test_vlm_messages.py)")
    rows, images = prompts(model)
    batch = batch_of(rows, images)
    with torch.no_grad():
        expected = generate(model, batch)
    tokenfuse.apply(model, method, keep=0.25, **OPTIONS.get(method, IN_LLM.get(method, {})))
    try:
        with torch.no_grad():
            logits = model(**batch).logits
        together = generate(model, batch)
        assert together.shape == expected.shape
        for i in range(len(rows)):
            alone = batch_of(rows, images, at=i)
            with torch.no_grad():
                one = model(**alone).logits[0]
            torch.testing.assert_close(logits[i, -len(one) :], one, atol=1e-4, rtol=1e-4)
            own = generate(model, alone)[0]  # shorter where the row ends (eos) before the batch does
            assert torch.equal(own, together[i, : len(own)]) and not bool(together[i, len(own) :].any())
    finally:
        tokenfuse.remove(model)


def llm_inputs(model, batch: dict) -> dict:
    """What the decoder LLM receives (its inputs_embeds and attention mask), from one forward."""
    seen = {}

    def keep(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], mask=kwargs["attention_mask"])

    handle = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen


@pytest.mark.parametrize("method", ["random", "divprune"])
def test_the_first_decoder_layer_gets_the_budget_of_the_whole_image_and_every_newline(model, method):
    """keep x (base view + unpadded crop tokens) content tokens per image, plus one newline per row of
    its crop grid, each newline right after the kept tokens of its row (the stated choice)."""
    rows, images = prompts(model)
    batch = batch_of(rows, images)
    host = packed(model, images["pixel_values"], SIZES)
    tokenfuse.apply(model, method, keep=0.25)
    try:
        seen = llm_inputs(model, batch)
        kept = tokenfuse.kept(model)
    finally:
        tokenfuse.remove(model)
    for i, (row, features) in enumerate(zip(rows, host, strict=True)):
        line = newlines(model, features)
        content, lines = int((~line).sum()), line.nonzero()[:, 0]
        budget = -(-content // 4)  # ceil(0.25 x content)
        real = seen["embeds"][i][seen["mask"][i].bool()]
        text = len(row) - (len(features))
        assert len(real) == text + budget + len(lines)
        assert len(kept[i]) == budget and not bool(line[kept[i]].any())  # kept content, never a newline
        span = real[1 : 1 + budget + len(lines)]
        got = newlines(model, span).nonzero()[:, 0]
        # newline j of the host's layout sits after the kept tokens that precede it there
        expected = torch.tensor([int((kept[i] < at).sum()) + j for j, at in enumerate(lines.tolist())])
        assert got.tolist() == expected.tolist()


def test_in_llm_operators_count_content_and_keep_every_newline(model):
    rows, images = prompts(model)
    batch = batch_of(rows, images)
    host = packed(model, images["pixel_values"], SIZES)
    tokenfuse.apply(model, "fastv", keep=0.25, layer=2)
    try:
        with torch.no_grad():
            model(**batch)
        trace = tokenfuse.patch_of(model).llm_trace
        kept = tokenfuse.kept(model)
    finally:
        tokenfuse.remove(model)
    content = torch.tensor([int((~newlines(model, f)).sum()) for f in host])
    budget = -(-content // 4)
    assert trace[1][1].tolist() == (batch["attention_mask"].sum(1) - content + budget).tolist()
    for k, features in zip(kept, host, strict=True):
        assert not bool(newlines(model, features)[k].any())
    assert [len(k) for k in kept] == budget.tolist()


def test_without_reduction_every_image_keeps_its_content_tokens(model):
    rows, images = prompts(model)
    host = packed(model, images["pixel_values"], SIZES)
    tokenfuse.apply(model, "random", keep=1.0)
    try:
        with torch.no_grad():
            model(**batch_of(rows, images))
        kept = tokenfuse.kept(model)
    finally:
        tokenfuse.remove(model)
    assert [k.tolist() for k in kept] == [(~newlines(model, f)).nonzero()[:, 0].tolist() for f in host]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(method="pool"), r"pool averages one patch grid.*base view plus unpadded crops.*random"),
        (dict(method="resize"), r"resize shrinks the pixels.*fixed patch grid.*random"),
        (dict(method=None, vision="tome"), r"token method in the vision tower.*packs every view.*no vision="),
    ],
)
def test_what_an_anyres_image_cannot_take_is_refused_with_the_reason(model, options, message):
    with pytest.raises(ValueError, match=message):
        tokenfuse.apply(model, **options, **({"keep": 0.25} if options["method"] else {}))
    assert tokenfuse.patch_of(model) is None


def test_onevision_videos_are_refused_while_reducing_and_run_unreduced():
    model = tiny_anyres("onevision")
    gen = torch.Generator().manual_seed(2)
    frames = torch.randn(1, 2, 3, 28, 28, generator=gen)  # 2 frames, pooled by the host to 2 x 2 each
    batch = rows_to_batch([[1, *[VIDEO] * 9, 5, 6]], None) | {"pixel_values_videos": frames}
    with torch.no_grad():
        logits = model(**batch).logits
    tokenfuse.apply(model, "random", keep=0.25)
    with pytest.raises(ValueError, match=r"not its videos.*pixel_values_videos.*tokenfuse\.remove"):
        model(**batch)
    tokenfuse.apply(model, "random", keep=1.0)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits)
