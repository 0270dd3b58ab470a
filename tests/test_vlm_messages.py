"""Messages a vision-language model user meets (issue 23): an unsupported family is named as such with
the supported ones, a token method given as a visual-token operator points to vision=, an operator
that scores by [CLS] attention refuses a tower without [CLS], and labels= on a reduced model is refused
before the forward. Each names the cause and the fix."""

from __future__ import annotations

import pytest
import torch
import transformers
from test_llava import prompts, rows_to_batch, tiny_llava
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

import tokenfuse

#: (config class, model class) of vision-language families tokenfuse does not support yet
FAMILIES = {
    "Qwen3-VL-MoE": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration"),
    "LLaVA-NeXT-Video": ("LlavaNextVideoConfig", "LlavaNextVideoForConditionalGeneration"),
    "Idefics3": ("Idefics3Config", "Idefics3ForConditionalGeneration"),
    "Gemma 3": ("Gemma3Config", "Gemma3ForConditionalGeneration"),
    "PaliGemma": ("PaliGemmaConfig", "PaliGemmaForConditionalGeneration"),
    "InternVL": ("InternVLConfig", "InternVLForConditionalGeneration"),
}


def unsupported(name: str) -> torch.nn.Module:
    """The family's model from its default config, on the meta device (no memory, no weights): the
    dispatcher reads the model's class and config only."""
    config, model = (getattr(transformers, n, None) for n in FAMILIES[name])
    if model is None:
        pytest.skip(f"this transformers has no {FAMILIES[name][1]}")
    with torch.device("meta"):
        return model(config())


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize(
    "options", [dict(method="visionzip"), dict(method=None, vision="tome")], ids=["operator", "vision"]
)
def test_an_unsupported_vlm_family_is_named_with_the_supported_ones(name, options):
    model = unsupported(name)
    with pytest.raises(TypeError, match=rf"{name} model .*vision-language model.*not support.*llava"):
        tokenfuse.apply(model, **options)
    assert tokenfuse.patch_of(model) is None


def test_a_token_method_as_an_operator_points_to_the_vision_tower():
    model = tiny_llava()
    with pytest.raises(ValueError, match=r"'tome' is a token method.*vision='tome'"):
        tokenfuse.apply(model, "tome")


def siglip_llava() -> LlavaForConditionalGeneration:
    """A LLaVA whose tower has no [CLS] token (SigLIP), selecting every token of its last layer."""
    torch.manual_seed(0)
    vision = SiglipVisionConfig(
        image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=65, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=64,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config).eval()


@pytest.mark.parametrize("method", ["visionzip", "todre", "recoverable", "vtc-cls"])
def test_cls_scoring_operators_refuse_a_tower_without_cls(method):
    model = siglip_llava()
    with pytest.raises(ValueError, match=r"\[CLS\] token's attention.*has no \[CLS\] token.*pool"):
        tokenfuse.apply(model, method, keep=0.25)
    assert tokenfuse.patch_of(model) is None


def test_operators_that_read_no_cls_run_on_a_tower_without_cls():
    model = siglip_llava()
    rows, pixels = prompts()
    tokenfuse.apply(model, "pool", keep=0.25)
    with torch.no_grad():
        model(**rows_to_batch(rows, pixels))
    assert [len(k) for k in tokenfuse.kept(model)] == [4, 4, 4]


def test_labels_on_a_reduced_vlm_are_refused_before_the_forward():
    model = tiny_llava()
    rows, pixels = prompts()
    batch = rows_to_batch(rows, pixels)
    labels = batch["input_ids"].clone()
    tokenfuse.apply(model, "pool", keep=0.25)
    with pytest.raises(ValueError, match=r"labels=.*kept positions only.*tokenfuse\.remove"):
        model(**batch, labels=labels)
    tokenfuse.apply(model, "pool", keep=1.0)  # nothing reduced: the loss is the model's own
    with torch.no_grad():
        assert model(**batch, labels=labels).loss is not None
