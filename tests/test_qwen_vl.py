"""The Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on tiny random models built from configs:
identical at keep 1.0, every boundary operator generating on images of different sizes, a row alike
alone and in a padded batch, the budget reaching the LLM, gathered 3-D positions (the text after an
image and decoding at the host's positions), pruning equal to masking, deepstack following the kept
tokens, and the refusals with their reasons."""

from __future__ import annotations

import math

import pytest
import torch
from test_llava import generate
from test_vlm_adapter import RecordingPrune
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

import tokenfuse
from tokenfuse.methods.vlm.fastv import FastV

IMAGE, START, END = 60, 61, 62
FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
GRIDS = [(8, 8), (8, 12), (12, 8)]  # patches; the merger makes 16, 24 and 24 tokens of them
BOUNDARY = ["pool", "random", "aim", "divprune", "cdpruner"]
PLACEMENTS = {"boundary": dict(method="divprune"), "llm": dict(method="fastv", layer=1)}


def tiny_qwen(family: str, attn: str = "sdpa", seed: int = 0):
    """Two tower layers (Qwen2.5-VL: one windowed, windows of 2 x 2 merged tokens; Qwen3-VL: both
    deepstack levels), four LLM layers, M-RoPE sections (2, 1, 1) of a head of 8."""
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    text = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_parameters=rope,
    )  # fmt: skip
    vision = dict(depth=2, num_heads=2, patch_size=4, temporal_patch_size=2, spatial_merge_size=2)
    tokens = dict(
        image_token_id=IMAGE, video_token_id=63, vision_start_token_id=START, vision_end_token_id=END
    )
    if family == "qwen2-vl":
        vision |= dict(embed_dim=16, hidden_size=32, mlp_ratio=2)
        config, model = (
            Qwen2VLConfig(text_config=text, vision_config=vision, **tokens),
            Qwen2VLForConditionalGeneration,
        )
    elif family == "qwen2.5-vl":
        vision |= dict(
            hidden_size=16,
            intermediate_size=32,
            out_hidden_size=32,
            window_size=16,
            fullatt_block_indexes=[1],
        )
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        model = Qwen2_5_VLForConditionalGeneration
    else:
        text |= dict(head_dim=8, rope_parameters=rope | {"mrope_interleaved": True})
        vision |= dict(hidden_size=16, intermediate_size=32, out_hidden_size=32, num_position_embeddings=16,
                       deepstack_visual_indexes=[0, 1])  # fmt: skip
        config, model = (
            Qwen3VLConfig(text_config=text, vision_config=vision, **tokens),
            Qwen3VLForConditionalGeneration,
        )
    config._attn_implementation = attn
    return model(config).eval()


def prompts(grids=GRIDS, lengths=(3, 6, 2), seed: int = 1) -> list[tuple[list[int], tuple[int, int] | None]]:
    """Rows of [bos, <start> image placeholders <end>, question], different questions and images."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for grid, length in zip(grids, lengths, strict=True):
        image = [] if grid is None else [START] + [IMAGE] * (grid[0] * grid[1] // 4) + [END]
        out.append(([1, *image, *torch.randint(3, IMAGE, (length,), generator=gen).tolist()], grid))
    return out


def batch_of(rows, left: bool = True, seed: int = 2) -> dict:
    """The processor's output for these rows: ids, mask, mm_token_type_ids, flattened patches, grids."""
    length = max(len(r) for r, _ in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (row, _) in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == IMAGE).int()}
    images = [(row, g) for row, g in rows if g is not None]
    if images:  # each row's pixels drawn from its own seed: the same alone and in any batch
        thw = torch.tensor([[1, h, w] for _, (h, w) in images])
        gens = [(torch.Generator().manual_seed(seed + sum(row)), h * w) for row, (h, w) in images]
        patches = [torch.randn(n, 3 * 2 * 4 * 4, generator=g) for g, n in gens]
        out |= {"pixel_values": torch.cat(patches), "image_grid_thw": thw}
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_qwen(request.param)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_keep_one_is_bit_identical_for_forward_and_generate(model, placement):
    batch = batch_of(prompts())
    with torch.no_grad():
        logits, tokens = model(**batch).logits, generate(model, batch)
        tokenfuse.apply(model, **PLACEMENTS[placement], keep=1.0)
        try:
            assert torch.equal(model(**batch).logits, logits)
            assert torch.equal(generate(model, batch), tokens)
            assert [k.tolist() for k in tokenfuse.kept(model)] == [list(range(h * w // 4)) for h, w in GRIDS]
        finally:
            tokenfuse.remove(model)
        assert torch.equal(model(**batch).logits, logits)


@pytest.mark.parametrize("operator", BOUNDARY)
def test_every_boundary_operator_generates_on_images_of_different_sizes(model, operator):
    """Each image keeps ceil(keep x its tokens): a function of its grid and the budget alone."""
    rows = prompts()
    batch = batch_of(rows)
    tokenfuse.apply(model, operator, keep=0.25)
    try:
        assert generate(model, batch).shape == (3, 4)
        expected = [math.ceil(h * w / 4 * 0.25) for h, w in GRIDS]
        assert [len(k) for k in tokenfuse.kept(model)] == expected == [4, 6, 6]
        with torch.no_grad():
            model(**batch_of(rows[1:2]))
        assert [len(k) for k in tokenfuse.kept(model)] == [6]
    finally:
        tokenfuse.remove(model)


@pytest.mark.parametrize("left", [True, False], ids=["left-padded", "right-padded"])
@pytest.mark.parametrize("placement", [*PLACEMENTS, "both"])
def test_a_row_gets_the_same_answer_alone_and_in_a_padded_batch(model, placement, left):
    rows = prompts(grids=[(8, 8), None, (12, 8)])
    options = PLACEMENTS.get(placement) or dict(method=[RecordingPrune(keep=0.5), FastV(keep=0.5, layer=2)])
    tokenfuse.apply(model, **options, **({} if placement == "both" else {"keep": 0.25}))
    try:
        batch = batch_of(rows, left=left)
        with torch.no_grad():
            logits = model(**batch).logits
        together = generate(model, batch) if left else None
        for i, row in enumerate(rows):
            alone = batch_of([row])
            with torch.no_grad():
                one = model(**alone).logits[0]
            real = logits[i][-len(one) :] if left else logits[i][: len(one)]
            torch.testing.assert_close(real, one, atol=1e-4, rtol=1e-4)
            if left:
                assert torch.equal(generate(model, alone)[0], together[i])
    finally:
        tokenfuse.remove(model)


def test_the_first_decoder_layer_receives_the_budget(model):
    rows = prompts()
    seen = []
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(
            kwargs.get("hidden_states", args[0] if args else None).shape[1]
        ),
        with_kwargs=True,
    )
    tokenfuse.apply(model, "divprune", keep=0.25)
    try:
        with torch.no_grad():
            model(**batch_of(rows))
        layout = tokenfuse.patch_of(model).last.layout
        assert (layout.visual & layout.valid).sum(1).tolist() == [4, 6, 6]
        assert seen == [max(len(r) - h * w // 4 + k for (r, (h, w)), k in zip(rows, [4, 6, 6], strict=True))]
    finally:
        hook.remove()
        tokenfuse.remove(model)


def unreduced_positions(batch: dict, kept: list[torch.Tensor]) -> torch.Tensor:
    """(B, L) the caller's positions a reduced prompt keeps: real text and each image's kept tokens
    (one image per row)."""
    is_image = batch["input_ids"] == IMAGE
    keep = batch["attention_mask"].bool() & ~is_image
    for row, k in enumerate(kept):
        keep[row, is_image[row].nonzero()[k, 0]] = True
    return keep


def test_positions_are_gathered_and_decoding_continues_at_the_hosts(model):
    """Kept tokens and the text after each image keep the unreduced prompt's 3-D position ids, and each
    decoding step of generate() gets the host's own."""
    batch = batch_of(prompts())
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_pre_hook(lambda m, a: seen.append(a[1]))
    try:
        generate(model, batch)
        full, seen[:] = list(seen), []
        tokenfuse.apply(model, RecordingPrune(keep=0.25))
        generate(model, batch)
        keep = unreduced_positions(batch, tokenfuse.kept(model))
        valid = tokenfuse.patch_of(model).last.layout.valid
        for row in range(3):
            assert torch.equal(seen[0][:, row, valid[row]], full[0][:, row, keep[row]])
        assert len(seen) == len(full) == 4
        assert all(torch.equal(a, b) for a, b in zip(seen[1:], full[1:], strict=True))
    finally:
        hook.remove()
        tokenfuse.remove(model)


def test_a_decode_loop_without_position_ids_follows_the_hosts_rope_deltas(model):
    """A step given no position ids gets the host's cache length + rope_deltas, which the reduced
    prefill sets to the reduced prompt's: the same positions and tokens as generate(). (The host
    computes such a step's positions from an attention mask wrongly, reduced or not: no mask here.)"""
    batch = {k: v for k, v in batch_of(prompts()[1:2]).items() if k != "attention_mask"}
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_pre_hook(lambda m, a: seen.append(a[1]))
    tokenfuse.apply(model, "divprune", keep=0.25)
    try:
        expected = generate(model, batch)
        steps, seen[:] = seen[1:], []
        with torch.no_grad():
            out, got = model(**batch), []
            for _ in range(4):
                got.append(out.logits[:, -1].argmax(-1, keepdim=True))
                out = model(input_ids=got[-1], cache=out.cache)
        assert torch.equal(torch.cat(got, 1), expected)
        assert all(torch.equal(a, b) for a, b in zip(seen[1:], steps, strict=False))
    finally:
        hook.remove()
        tokenfuse.remove(model)


def masked(keep: torch.Tensor):
    """A decoder-layer pre-hook letting no token attend to the positions `keep` (B, L) leaves out."""

    def hook(module, args, kwargs):
        mask, L = kwargs["attention_mask"], keep.shape[1]
        base = torch.ones(L, L, dtype=torch.bool).tril()[None, None] if mask is None else mask
        return args, {
            **kwargs,
            "attention_mask": base & keep[:, None, None, :] | torch.eye(L, dtype=torch.bool),
        }

    return hook


def test_boundary_pruning_equals_masking_the_dropped_tokens(model):
    """With gathered positions the reduced prefill is the unreduced model whose layers may not attend
    to the dropped visual tokens: the same logits at every text position."""
    batch = batch_of(prompts())
    tokenfuse.apply(model, RecordingPrune(keep=0.25))
    with torch.no_grad():
        reduced = model(**batch).logits
    layout = tokenfuse.patch_of(model).last.layout
    keep = unreduced_positions(batch, tokenfuse.kept(model))
    tokenfuse.remove(model)
    hooks = [
        layer.register_forward_pre_hook(masked(keep), with_kwargs=True)
        for layer in model.model.language_model.layers
    ]
    with torch.no_grad():
        full = model(**batch).logits
    for h in hooks:
        h.remove()
    text = batch["attention_mask"].bool() & (batch["input_ids"] != IMAGE)
    torch.testing.assert_close(reduced[layout.valid & ~layout.visual], full[text], atol=1e-5, rtol=1e-5)


def test_in_llm_pruning_equals_masking_from_that_layer_on(model):
    """FastV entering layer 1, before Qwen3-VL's second deepstack layer: the deepstack features follow
    the kept tokens, and the last token's logits are the masked model's."""

    class Recording(FastV):
        def decide(self, inp):
            red = super().decide(inp)
            self.kept = red.dest[..., 0] >= 0
            return red

    batch = batch_of(prompts())
    method = Recording(keep=0.25, layer=1)
    tokenfuse.apply(model, method)
    with torch.no_grad():
        reduced = model(**batch).logits[:, -1]
    tokenfuse.remove(model)
    layers = model.model.language_model.layers[1:]
    hooks = [layer.register_forward_pre_hook(masked(method.kept), with_kwargs=True) for layer in layers]
    with torch.no_grad():
        full = model(**batch).logits[:, -1]
    for h in hooks:
        h.remove()
    assert int(method.kept.sum()) < int(batch["attention_mask"].sum())
    torch.testing.assert_close(reduced, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        *[(dict(method=m), r"\[CLS\] token's attention.*has no \[CLS\] token.*divprune") for m in
          ("visionzip", "todre", "recoverable", "vtc-cls")],
        (dict(method="resize"), r"changes the pixels.*max_pixels.*pool"),
        (dict(method=None, vision="tome"), r"2 x 2 group.*every patch.*boundary operator"),
    ],
)  # fmt: skip
def test_what_a_qwen_tower_cannot_serve_is_refused_with_the_reason(model, options, message):
    with pytest.raises(ValueError, match=message):
        tokenfuse.apply(model, **options)
    assert tokenfuse.patch_of(model) is None


def test_a_token_method_in_the_windowed_tower_names_the_windows():
    with pytest.raises(ValueError, match="windowed attention.*reorders the patches"):
        tokenfuse.apply(tiny_qwen("qwen2.5-vl"), None, vision="tome", vision_keep=0.5)


def test_videos_are_refused_while_images_are_reduced(model):
    batch = batch_of(prompts())
    batch["pixel_values_videos"] = batch["pixel_values"]
    tokenfuse.apply(model, "pool", keep=0.25)
    try:
        with pytest.raises(ValueError, match=r"not videos.*tokenfuse\.remove"):
            model(**batch)
    finally:
        tokenfuse.remove(model)
