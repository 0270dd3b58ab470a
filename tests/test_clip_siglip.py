"""CLIP and SigLIP vision towers, alone and as the image half of the dual encoders: the text half
is left alone, CLIP pools its [CLS] through the host's post-norm, SigLIP's attention-pooling head
weighs merged tokens by size, and SigLIP (no [CLS]) refuses methods that score by [CLS] attention.
The contracts every vision family owes (every method, sdpa and eager) run in test_contracts."""

from functools import partial

import pytest
import torch
import transformers
from conftest import ATTN, TEXT_TOWER, VISION, VIT, images, vision_outputs

import tokenfuse
from tokenfuse.core import pool_mean

FAMILIES = ["hf-clip", "hf-clip-dual", "hf-siglip", "hf-siglip-dual"]


def tower(model):
    return getattr(model, "vision_model", model)


def image_outputs(model, pixels):
    """The tower's output of a tower or a dual encoder: last hidden state, pooled (or image embedding)."""
    with torch.inference_mode():
        if hasattr(model, "get_image_features"):
            out = model.get_image_features(pixel_values=pixels)
        else:
            out = model(pixel_values=pixels)
    return out.last_hidden_state, out.pooler_output


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("dual", ["hf-clip-dual", "hf-siglip-dual"])
def test_dual_encoder_keep_one_is_bit_identical_and_the_text_half_is_never_reduced(dual, attn):
    model = VISION[dual](attn)
    pixels, ids = images(), torch.randint(2, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(input_ids=ids, pixel_values=pixels)
    tokenfuse.apply(model, "tome", keep=1.0)
    with torch.inference_mode():
        same = model(input_ids=ids, pixel_values=pixels)
    for key in ("logits_per_image", "image_embeds", "text_embeds"):
        assert torch.equal(before[key], same[key]), key
    tokenfuse.apply(model, "tome", keep=0.5)
    with torch.inference_mode():
        reduced = model(input_ids=ids, pixel_values=pixels)
    assert torch.equal(reduced.text_embeds, before.text_embeds)
    assert reduced.vision_model_output.last_hidden_state.shape[1] < 65
    assert not torch.allclose(reduced.image_embeds, before.image_embeds, atol=1e-4)
    text_layers = {id(m) for m in model.text_model.modules()}
    hooked = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked and not any(id(m) in text_layers for m in hooked)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_row_equals_the_row_alone(family):
    """Every token and the pooled output: ToMe keeps the same count per image, so rows line up."""
    model = tokenfuse.apply(VISION[family](), "tome", keep=0.5)
    pixels = images()
    hidden, pooled = image_outputs(model, pixels)
    assert hidden.shape[1] < 64
    for i in range(len(pixels)):
        alone = image_outputs(model, pixels[i : i + 1])
        assert torch.allclose(alone[0][0], hidden[i], atol=1e-5), i
        assert torch.allclose(alone[1][0], pooled[i], atol=1e-5), i


def test_clip_pools_its_cls_token_through_the_hosts_post_norm():
    """pre_layrnorm runs on the full grid (the pass opens at its output, so even a reduction right
    there comes after it); the pooled output is post_layernorm of [CLS], which stays first."""
    model = VISION["hf-clip"]()
    seen = []
    model.pre_layrnorm.register_forward_hook(
        lambda m, args, out: seen.append((args[0].shape[1], out.shape[1]))
    )
    tokenfuse.apply(model, "tome", schedule=[0.5, 0.5, 0.5, 0.5])  # reduces at the embeddings too
    hidden, pooled = image_outputs(model, images())
    assert seen == [(65, 33)] and hidden.shape[1] == 33  # the norm saw every token, then was reduced
    tokens = tokenfuse.last_tokens(model)
    assert torch.all(tokens.protected[:, 0]) and torch.all(tokens.size[:, 0] == 1)
    with torch.inference_mode():
        assert torch.equal(pooled, model.post_layernorm(hidden[:, 0]))


def constant_patches_model(family):
    """A tower without position embeddings (zeroed), so that equal patches stay equal tokens in
    every layer, and an image of two patterns, 48 and 16 patches: merging equal tokens loses nothing
    when every attention (the head's included) counts a token as the patches it stands for."""
    model = VISION[family]()
    with torch.no_grad():
        tower(model).embeddings.position_embedding.weight.zero_()
    pixels = torch.zeros(1, 3, 32, 32)
    pixels[..., :8, :] = 1.0  # the first two rows of 4x4 patches: 16 patches of one pattern
    pixels[..., 8:, :] = torch.linspace(-1, 1, 4).repeat(8)  # 48 of another
    return model, pixels


@pytest.mark.parametrize("family", ["hf-clip", "hf-siglip", "hf-siglip-dual"])
def test_merging_equal_tokens_leaves_the_pooled_output_as_it_was(family):
    model, pixels = constant_patches_model(family)
    full = image_outputs(model, pixels)[1]
    tokenfuse.apply(model, "tome", keep=0.5)
    hidden, pooled = image_outputs(model, pixels)
    sizes = tokenfuse.token_sizes(model)
    assert hidden.shape[1] < 40 and sizes.max() > 2
    assert torch.allclose(pooled, full, atol=1e-5), (pooled - full).abs().max()
    if "siglip" in family:  # the same head without the sizes (hooks removed) gives another embedding
        tokenfuse.remove(model)
        with torch.inference_mode():
            unweighted = tower(model).head(hidden)
        assert not torch.allclose(unweighted, full, atol=1e-3)


@pytest.mark.parametrize("family", ["hf-siglip", "hf-siglip-dual"])
@pytest.mark.parametrize("method", ["evit", "ats"])
def test_siglip_refuses_methods_that_score_by_cls_attention(family, method):
    model = VISION[family]()
    with pytest.raises(ValueError, match=rf"{method} scores tokens by \[CLS\] attention") as err:
        tokenfuse.apply(model, method, keep=0.5)
    assert "hf-siglip models have no [CLS] token" in str(err.value)
    assert "choose a method that does not" in str(err.value)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    tokenfuse.apply(model, "tome", keep=0.5)  # ToMe matches by keys or features: accepted
    assert image_outputs(model, images())[0].shape[1] < 64


def classifier_parts(model, pixels):
    """(logits, the tower's last hidden state) of one forward of a CLIP / SigLIP image classifier."""
    final = {}

    def keep(module, args, out):
        final["x"] = out[0]

    handle = model.vision_model.register_forward_hook(keep)
    with torch.inference_mode():
        logits = model(pixel_values=pixels).logits
    handle.remove()
    return logits, final["x"]


@pytest.mark.parametrize(
    ("head", "config", "prefix"), [("CLIP", "CLIPConfig", 1), ("Siglip", "SiglipConfig", 0)]
)
def test_image_classifiers_average_the_patch_tokens_by_size(head, config, prefix):
    torch.manual_seed(0)
    config = getattr(transformers, config)(
        text_config=TEXT_TOWER, vision_config=dict(**VIT, intermediate_size=64), num_labels=5
    )
    model = getattr(transformers, f"{head}ForImageClassification")(config).eval()
    pixels = images()
    before = classifier_parts(model, pixels)
    tokenfuse.apply(model, "tome", keep=1.0)
    for a, b in zip(before, classifier_parts(model, pixels), strict=True):
        assert torch.equal(a, b)
    tokenfuse.apply(model, "tome", keep=0.5)
    logits, x = classifier_parts(model, pixels)
    size = tokenfuse.token_sizes(model)
    assert (size != 1).any()
    classify = partial(torch.nn.functional.linear, weight=model.classifier.weight, bias=model.classifier.bias)
    with torch.inference_mode():  # by hand: the hooked classifier takes only the model's own pooling
        want = classify(pool_mean(x[:, prefix:], size[:, prefix:]))
        unweighted = classify(x[:, prefix:].mean(1))
    assert torch.allclose(logits, want, atol=1e-6) and not torch.allclose(logits, unweighted, atol=1e-4)


def test_clip_vision_model_with_projection_embeds_the_pooled_cls():
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(**VIT, intermediate_size=64, projection_dim=16)
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    pixels = images()
    with torch.inference_mode():
        before = model(pixel_values=pixels).image_embeds
        tokenfuse.apply(model, "tome", keep=1.0)
        assert torch.equal(model(pixel_values=pixels).image_embeds, before)
        tokenfuse.apply(model, "tome", keep=0.5)
        out = model(pixel_values=pixels)
        cls = model.vision_model.post_layernorm(out.last_hidden_state[:, 0])
        assert out.last_hidden_state.shape[1] < 65
        assert torch.equal(out.image_embeds, model.visual_projection(cls))


def test_the_contract_helpers_read_the_image_half_of_a_dual_encoder():
    """The contract tests' outputs of a dual encoder are its image features (hidden, embedding)."""
    model = VISION["hf-clip-dual"]()
    hidden, embedding = vision_outputs(model, images())
    assert hidden.shape == (3, 65, 32) and embedding.shape == (3, 16)
