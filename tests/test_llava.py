"""The LLaVA adapter on a tiny random LlavaForConditionalGeneration (DINOv2 tower, Llama LLM): every
placement bit-identical at keep 1.0 for forward and generate(), a row's answer the same alone and in a
padded batch (either padding side, text-only rows, different questions), remove() exact, copies and
threads, the decode-step translation, and clear errors."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    Dinov2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import tokenfuse

IMAGE = 64  # the image token id
PER_IMAGE = 16  # 28 px / patch 7 = 4 x 4
PLACEMENTS = {  # name: apply() arguments
    "boundary": dict(method="pool"),
    "boundary-scored": dict(method="visionzip"),
    "boundary-question": dict(method="recoverable"),
    "boundary-diversity": dict(method="divprune"),
    "boundary-conditional-diversity": dict(method="cdpruner"),
    "llm": dict(method="fastv"),
    "llm-question": dict(method="sparsevlm", layers=(1, 2, 3)),
    "llm-progressive": dict(method="aim-prune", layer=1, end=3),
    "tower": dict(method=None, vision="tome"),
    "all": dict(method=["random", "fastv"], vision="tome"),
}


def tiny_llava(attn: str = "sdpa", seed: int = 0, tower: str = "dinov2") -> LlavaForConditionalGeneration:
    """A DINOv2 tower selecting its last layer, or LLaVA-1.5's layout: a CLIP tower, the layer before
    its last."""
    torch.manual_seed(seed)
    sizes = dict(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=3, num_attention_heads=2)
    if tower == "dinov2":
        vision = Dinov2Config(**sizes, intermediate_size=64, layerscale_value=1.0)
    else:
        vision = CLIPVisionConfig(**sizes, intermediate_size=64)
    text = LlamaConfig(
        vocab_size=65,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=IMAGE,
        vision_feature_layer=-1 if tower == "dinov2" else -2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn
    return LlavaForConditionalGeneration(config).eval()


def rows_to_batch(rows: list[list[int]], pixels: torch.Tensor | None, left: bool = True) -> dict:
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    out = {"input_ids": ids, "attention_mask": mask}
    return out if pixels is None else out | {"pixel_values": pixels}


def prompts(
    seed: int = 1, lengths=(3, 6, 2), images=(True, True, True)
) -> tuple[list[list[int]], torch.Tensor]:
    """Rows of [bos, image placeholders?, question]: different questions, some without an image."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for length, image in zip(lengths, images, strict=True):
        question = torch.randint(3, IMAGE, (length,), generator=gen).tolist()
        rows.append([1] + [IMAGE] * PER_IMAGE * image + question)
    return rows, torch.randn(sum(images), 3, 28, 28, generator=gen)


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def generate(model, batch: dict, n: int = 4) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=n, do_sample=False)[:, batch["input_ids"].shape[1] :]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_keep_one_is_bit_identical_for_forward_and_generate(placement, attn):
    model = tiny_llava(attn)
    rows, pixels = prompts()
    batch = rows_to_batch(rows, pixels)
    with torch.no_grad():
        logits, tokens = model(**batch).logits, generate(model, batch)
        options = {**PLACEMENTS[placement], "keep": 1.0}
        if options.get("vision"):
            options["vision_keep"] = 1.0
        if options["method"] is None:
            del options["keep"]
        tokenfuse.apply(model, **options)
        assert torch.equal(model(**batch).logits, logits)
        assert torch.equal(generate(model, batch), tokens)
        tokenfuse.remove(model)
        assert torch.equal(model(**batch).logits, logits)


@pytest.mark.parametrize(
    ("method", "options"), [("visionzip", {}), ("vtc-cls", {"start_layer": -2}), ("fastv", {})]
)
def test_llava_1_5_layout_clip_tower_penultimate_layer(method, options):
    """LLaVA-1.5's configuration (CLIP tower, features of its penultimate layer): identical at keep
    1.0, and a row's answer the same alone and in a batch at keep 0.25."""
    model = tiny_llava(tower="clip")
    rows, pixels = prompts()
    batch = rows_to_batch(rows, pixels)
    expected = generate(model, batch)
    tokenfuse.apply(model, method, keep=1.0, **options)
    assert torch.equal(generate(model, batch), expected)
    tokenfuse.apply(model, method, keep=0.25, **options)
    together = generate(model, batch)
    assert not torch.equal(together, expected) or method == "fastv"
    for i, row in enumerate(rows):
        assert torch.equal(generate(model, rows_to_batch([row], pixels[i : i + 1]))[0], together[i])


@pytest.mark.parametrize("left", [True, False], ids=["left-padded", "right-padded"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_a_row_gets_the_same_answer_alone_and_in_a_padded_batch(model, placement, left):
    rows, pixels = prompts(images=(True, False, True))
    options = {**PLACEMENTS[placement]}
    if options["method"] is not None:
        options["keep"] = 0.25
    tokenfuse.apply(model, **options)
    try:
        batch = rows_to_batch(rows, pixels, left=left)
        with torch.no_grad():
            logits = model(**batch).logits
        together = generate(model, rows_to_batch(rows, pixels)) if left else None
        image = 0
        for i, row in enumerate(rows):
            has = IMAGE in row
            alone = rows_to_batch([row], pixels[image : image + 1] if has else None)
            image += has
            with torch.no_grad():
                one = model(**alone).logits
            n = one.shape[1]
            real = logits[i][:n] if not left else logits[i][-n:]
            torch.testing.assert_close(real, one[0], atol=1e-5, rtol=1e-4)
            if left:
                assert torch.equal(generate(model, alone)[0], together[i])
    finally:
        tokenfuse.remove(model)


def test_boundary_reduction_shortens_the_prompt_and_keeps_the_count(model):
    rows, pixels = prompts()
    batch = rows_to_batch(rows, pixels)
    tokenfuse.apply(model, "pool", keep=0.25)
    try:
        with torch.no_grad():
            out = model(**batch)
        patch = tokenfuse.patch_of(model)
        assert patch.last.boundary.count.tolist() == [4, 4, 4]
        assert out.logits.shape[1] == batch["input_ids"].shape[1] - (PER_IMAGE - 4)
        # the cache holds the reduced prefix, and generate() continues from it
        assert out.cache.get_seq_length() == out.logits.shape[1]
        assert generate(model, batch, n=3).shape == (3, 3)
    finally:
        tokenfuse.remove(model)


def test_in_llm_stage_keeps_the_text_and_the_visual_count(model):
    rows, pixels = prompts()
    batch = rows_to_batch(rows, pixels)
    tokenfuse.apply(model, "fastv", keep=0.25, layer=2)
    try:
        with torch.no_grad():
            out = model(**batch)
        trace = tokenfuse.patch_of(model).llm_trace
        real = batch["attention_mask"].sum(1)
        assert [layer for layer, _ in trace] == [0, 2]
        assert trace[0][1].tolist() == real.tolist()
        assert trace[1][1].tolist() == (real - (PER_IMAGE - 4)).tolist()
        # layers before 2 cache every token, later ones the kept ones
        assert out.cache.layers[1].keys.shape[2] == batch["input_ids"].shape[1]
        assert out.cache.layers[2].keys.shape[2] == int(trace[1][1].max())
    finally:
        tokenfuse.remove(model)


def test_a_hand_written_decode_loop_gets_the_same_tokens_as_generate(model):
    """The caller grows the unreduced mask and positions; the record on the cache translates them."""
    rows, pixels = prompts()
    batch = rows_to_batch(rows, pixels)
    tokenfuse.apply(model, ["pool", "fastv"], keep=0.5)
    try:
        expected = generate(model, batch, n=3)
        mask = batch["attention_mask"]
        position = (mask.cumsum(1) - 1).clamp_min(0)
        with torch.no_grad():
            out = model(**batch, position_ids=position)
            got = []
            for _ in range(3):
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                got.append(token)
                mask = torch.cat([mask, torch.ones_like(token)], 1)
                position = position[:, -1:] + 1
                out = model(input_ids=token, attention_mask=mask, position_ids=position, cache=out.cache)
        assert torch.equal(torch.cat(got, 1), expected)
    finally:
        tokenfuse.remove(model)


def test_copies_and_threads_keep_their_own_state(model):
    rows, pixels = prompts()
    batch = rows_to_batch(rows, pixels)
    tokenfuse.apply(model, ["visionzip", "fastv"], keep=0.5)
    try:
        expected = generate(model, batch)
        assert torch.equal(generate(copy.deepcopy(model), batch), expected)
        results = [None] * 4

        def run(i):
            results[i] = generate(model, batch)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(torch.equal(r, expected) for r in results)
    finally:
        tokenfuse.remove(model)


def test_pickles_before_a_forward():
    """transformers' own output-capturing hooks make any model unpicklable after a forward."""
    model = tiny_llava()
    tokenfuse.apply(model, ["pool", "fastv"], keep=0.5)
    rows, pixels = prompts()
    batch = rows_to_batch(rows, pixels)
    copy_ = pickle.loads(pickle.dumps(model))
    assert torch.equal(generate(copy_, batch), generate(model, batch))


def test_the_tower_output_is_reduced_even_after_an_unpatched_run():
    """transformers installs its output-capturing hooks on the first forward; the adapters' hooks run
    before them, so hidden states (which LLaVA selects its features from) are the reduced ones."""
    model = tiny_llava()
    rows, pixels = prompts()
    batch = rows_to_batch(rows, pixels)
    with torch.no_grad():
        model(**batch)
        tokenfuse.apply(model, None, vision="tome", vision_keep=0.5)
        out = model(**batch)
    kept = tokenfuse.patch_of(model).last.boundary.count
    assert bool((kept < PER_IMAGE).all())
    assert out.logits.shape[1] == batch["input_ids"].shape[1] - int(PER_IMAGE - kept[0])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(method="visionzipp"), "unknown visual-token operator"),
        (dict(method="pool", keep=0.0), "keep must be a number in"),
        (dict(method="fastv", layer=9), "layer must be in 1..3"),
        (dict(method="pool", layer=2), "takes no layer"),
        (dict(method=["pool", "random"]), "one boundary operator"),
        (dict(method="tome"), "unknown visual-token operator"),
        (dict(method=None), "give a visual-token operator"),
        (dict(method="pool", protect_ids=[3]), "protect_ids"),
        (dict(method=None, vision="pool2"), "unknown method"),
        (dict(method="visionzip", vision="tome"), "scores with the tower's attention"),
        (dict(method="vtc-cls", start_layer=-7), "outside the tower's 3 layers"),
        (dict(method="pool", vision_keep=0.5), "vision_keep was given without vision"),
    ],
)
def test_bad_arguments_are_refused_clearly(model, options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tokenfuse.apply(model, **options)
    assert tokenfuse.patch_of(model) is None


def test_a_token_method_on_a_vlm_is_redirected():
    from tokenfuse import adapters
    from tokenfuse.methods import make

    with pytest.raises(TypeError, match="visual-token operator"):
        adapters.install(tiny_llava(), make("tome"))


def test_in_llm_pruning_equals_masking_the_dropped_tokens_from_that_layer_on():
    """The reduced sequence (gathered rotary angles, positions and mask) computes what the full one
    computes when layers from K on may not attend to the dropped tokens: same last-token logits."""
    from tokenfuse.methods.vlm.fastv import FastV

    class Recording(FastV):
        def decide(self, inp):
            red = super().decide(inp)
            self.kept = red.dest[..., 0] >= 0
            return red

    model = tiny_llava()
    rows, pixels = prompts()
    batch = rows_to_batch(rows, pixels)
    method = Recording(keep=0.25, layer=2)
    tokenfuse.apply(model, method)
    with torch.no_grad():
        reduced = model(**batch).logits[:, -1]
    tokenfuse.remove(model)

    def masked(module, args, kwargs):
        mask = kwargs["attention_mask"]
        L = method.kept.shape[1]
        base = torch.ones(L, L, dtype=torch.bool).tril()[None, None] if mask is None else mask
        allowed = base & method.kept[:, None, None, :] | torch.eye(L, dtype=torch.bool)
        return args, {**kwargs, "attention_mask": allowed}

    hooks = [
        layer.register_forward_pre_hook(masked, with_kwargs=True)
        for layer in model.model.language_model.layers[2:]
    ]
    with torch.no_grad():
        full = model(**batch).logits[:, -1]
    for h in hooks:
        h.remove()
    assert int(method.kept.sum()) < int(batch["attention_mask"].sum())
    torch.testing.assert_close(reduced, full, atol=1e-5, rtol=1e-4)
