"""Models the adapters' hooks would run, but wrongly, off the tested path: each is either made right
(attention read where the layer really computes it, pooling heads weighted by size, the engine's mask
reaching the attention) or refused with the reason and the fix (per-token heads, decoders, relative
positions). timm tests carry `timm` in their names, for the timm environment's `-k timm` run."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from conftest import ATTN, MODELS, VISION, images, tiny_bert, tiny_timm, vision_outputs

import tokenfuse
from tokenfuse.adapters.local_attention import window_bias
from tokenfuse.core import Reduction, attention_bias, pool_mean
from tokenfuse.methods import Method


def rebuilt(build, cls_name: str, **changes):
    """A tiny model's configuration, changed, under another head class (same seed)."""
    config = build().config
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config).eval()


def text_inputs(tokenizer, texts):
    return tokenizer(texts, padding=True, return_tensors="pt")


class Recorder(Method):
    """Reads attention, moves no token, and keeps what it was given at each reduction point."""

    name = "recorder"
    paper = "none: a test device"
    needs = frozenset({"attention"})

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def decide(self, inp):
        self.seen.append(inp)
        B, N, _ = inp.x.shape
        return Reduction.hard(torch.arange(N).expand(B, N))


# 1. attention that changes queries and keys after the projection, and relative positions


def test_timm_qk_norm_methods_read_the_normalised_queries_and_keys():
    model = tiny_timm(qk_norm=True)
    normed = {}
    for i, block in enumerate(model.blocks):
        for name in "qk":
            module = getattr(block.attn, f"{name}_norm")
            module.register_forward_hook(lambda m, a, out, key=(i, name): normed.__setitem__(key, out))
    recorder = Recorder(keep=0.5)
    tokenfuse.apply(model, recorder)
    with torch.inference_mode():
        model.forward_features(images())
    assert len(recorder.seen) == len(model.blocks)
    for i, inp in enumerate(recorder.seen):
        assert torch.equal(inp.q, normed[i, "q"]) and torch.equal(inp.k, normed[i, "k"])


@pytest.mark.parametrize("method", ["tome", "evit", "zero-tprune"])
def test_timm_qk_norm_reduces_with_attention_methods(method):
    model = tokenfuse.apply(tiny_timm(qk_norm=True), method, keep=0.5)
    features, logits = vision_outputs(model, images())
    assert features.shape[1] < 65 and torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", ["relative_key", "relative_key_query"])
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_relative_positions_are_refused_for_every_method(family, kind):
    model = rebuilt(MODELS[family], type(MODELS[family]().base_model).__name__, position_embedding_type=kind)
    for method in tokenfuse.available():
        with pytest.raises(ValueError, match=f"position_embedding_type={kind!r}.*'absolute'"):
            tokenfuse.apply(model, method, keep=0.5)
    assert tokenfuse.patch_of(model) is None


# 2. per-token heads and decoders


TOKEN_HEADS = [
    ("bert", "BertForMaskedLM"),
    ("bert", "BertForTokenClassification"),
    ("bert", "BertForQuestionAnswering"),
    ("bert", "BertForPreTraining"),
    ("roberta", "RobertaForMaskedLM"),
    ("roberta", "RobertaForTokenClassification"),
    ("distilbert", "DistilBertForMaskedLM"),
    ("distilbert", "DistilBertForQuestionAnswering"),
]


@pytest.mark.parametrize(("family", "head"), TOKEN_HEADS)
def test_per_token_text_heads_are_refused(family, head):
    model = rebuilt(MODELS[family], head)
    with pytest.raises(TypeError, match=rf"{head} returns one output per input token.*to_grid"):
        tokenfuse.apply(model, "tome", keep=0.5)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("head", ["BertModel", "BertLMHeadModel"])
def test_decoders_are_refused(head):
    model = rebuilt(tiny_bert, head, is_decoder=True)
    with pytest.raises((ValueError, TypeError), match="decoder|per input token"):
        tokenfuse.apply(model, "tome", keep=0.5)
    with pytest.raises(ValueError, match="is_decoder=False"):
        tokenfuse.apply(rebuilt(tiny_bert, "BertModel", is_decoder=True), "evit", keep=0.5)


@pytest.mark.parametrize(
    ("family", "head"),
    [
        ("bert", "BertForSequenceClassification"),
        ("bert", "BertForMultipleChoice"),
        ("roberta", "RobertaForSequenceClassification"),
        ("distilbert", "DistilBertForSequenceClassification"),
    ],
)
def test_pooled_text_heads_stay_supported(family, head, tokenizer, texts):
    model = rebuilt(MODELS[family], head)
    inputs = text_inputs(tokenizer, texts)
    if head.endswith("MultipleChoice"):
        inputs = {k: v[None] for k, v in inputs.items()}
    with torch.inference_mode():
        before = model(**inputs).logits
        same = tokenfuse.apply(model, "tome", keep=1.0)(**inputs).logits
        reduced = tokenfuse.apply(model, "tome", keep=0.5)(**inputs).logits
    assert torch.equal(before, same)
    assert reduced.shape == before.shape and not torch.equal(reduced, before)
    assert tokenfuse.token_sizes(model).shape[1] < inputs["input_ids"].shape[-1]


def test_the_refusals_fix_maps_tokens_back_for_a_token_head(tokenizer, texts):
    """What the refusal advises: reduce the base encoder, map back with to_grid, run the head."""
    model = rebuilt(tiny_bert, "BertForTokenClassification")
    inputs = text_inputs(tokenizer, texts)
    tokenfuse.apply(model.bert, "tome", keep=0.5, track_source=True)
    with torch.inference_mode():
        hidden = model.bert(**inputs).last_hidden_state
        logits = model.classifier(tokenfuse.to_grid(model.bert, hidden))
    assert hidden.shape[1] < inputs["input_ids"].shape[1] == logits.shape[1]


@pytest.mark.parametrize(("build", "head"), [(VISION["hf-vit"], "ViTForMaskedImageModeling")])
def test_dense_vision_heads_are_refused(build, head):
    """Backbones (Dinov2Backbone) are served: test_dense_backbones."""
    with pytest.raises(TypeError, match=rf"{head} returns one output per input token.*to_grid"):
        tokenfuse.apply(rebuilt(build, head), "tome", keep=0.5)


# 3. heads that pool tokens


def timm_pooled(model, pixels):
    """(final tokens, the head's pooled features, its logits) of one patched forward."""
    with torch.inference_mode():
        features = model.forward_features(pixels)
        return features, model.forward_head(features, pre_logits=True), model(pixels)


class Ragged(Method):
    """Merges the last 2 (b + 1) real tokens of image b into the one before them: sizes above 1,
    and a different count per image, so padding."""

    name = "ragged"
    paper = "none: a test device"
    adaptive = True

    def decide(self, inp):
        B, N, _ = inp.x.shape
        start = inp.tokens.count - 2 * torch.arange(1, B + 1)
        j = torch.arange(N)
        return Reduction.hard(torch.where(j < start[:, None], j, start[:, None] - 1))


@pytest.mark.parametrize("pool", ["avg", "avgmax", "max"])
@pytest.mark.parametrize("method", ["tome", "ragged"])
def test_timm_pooling_weighs_tokens_by_size(pool, method):
    def reduction(keep):
        return Ragged(keep=keep) if method == "ragged" else tokenfuse.methods.make(method, keep=keep)

    model = tiny_timm(global_pool=pool, reg_tokens=2)
    pixels = images()
    before = timm_pooled(model, pixels)
    tokenfuse.apply(model, reduction(1.0))
    for a, b in zip(before, timm_pooled(model, pixels), strict=True):
        assert torch.equal(a, b)
    tokenfuse.apply(model, reduction(0.5))
    features, pooled, logits = timm_pooled(model, pixels)
    size = tokenfuse.token_sizes(model)[:, 3:]
    tokenfuse.remove(model)
    assert (size != 1).any()
    x = features[:, 3:]
    mean = pool_mean(x, size)
    most = x.masked_fill(size[..., None] == 0, -torch.inf).amax(1)
    with torch.inference_mode():
        want = model.fc_norm({"avg": mean, "max": most, "avgmax": (mean + most) / 2}[pool])
        assert torch.allclose(pooled, want, atol=1e-6)
        assert torch.allclose(logits, model.head(want), atol=1e-6)


def test_timm_attention_pooling_gets_the_engines_mask():
    model = tokenfuse.apply(tiny_timm(global_pool="map"), "tome", keep=0.5)
    features, pooled, _ = timm_pooled(model, images())
    bias = attention_bias(tokenfuse.last_tokens(model), features.dtype, True)
    tokenfuse.remove(model)
    with torch.inference_mode():
        want = model.fc_norm(model.attn_pool(features[:, 1:], attn_mask=bias[..., 1:]))
    assert torch.allclose(pooled, want, atol=1e-6)


def test_timm_pooling_without_sizes_is_refused():
    model = tiny_timm(global_pool="prr")
    with pytest.raises(ValueError, match="global_pool='prr'.*'avg'"):
        tokenfuse.apply(model, "tome", keep=0.5)


def test_timm_attention_pooling_without_a_mask_is_refused():
    class NoMask(torch.nn.Module):
        def forward(self, x):
            return x.mean(1)

    model = tiny_timm(global_pool="map")
    model.attn_pool = NoMask()
    with pytest.raises(ValueError, match="NoMask.*takes no attention mask"):
        tokenfuse.apply(model, "tome", keep=0.5)


def test_timm_head_on_other_tokens_is_refused():
    model = tokenfuse.apply(tiny_timm(global_pool="avg"), "tome", keep=0.5)
    features, _, _ = timm_pooled(model, images())
    with pytest.raises(RuntimeError, match="not the pooling of the patched model's last output"):
        model.forward_head(features * 2)


def hf_classifier_parts(model, pixels):
    """(logits, final tokens) of one forward of a Hugging Face image classifier."""
    final = {}
    handle = model.base_model.layernorm.register_forward_hook(lambda m, a, out: final.setdefault("x", out))
    with torch.inference_mode():
        logits = model(pixel_values=pixels).logits
    handle.remove()
    return logits, final["x"]


@pytest.mark.parametrize(
    ("family", "head"),
    [
        ("hf-dinov2", "Dinov2ForImageClassification"),
        ("hf-dinov2-registers", "Dinov2WithRegistersForImageClassification"),
        ("hf-vit", "ViTForImageClassification"),
    ],
)
def test_hf_image_classifiers_pool_by_size(family, head):
    model = rebuilt(VISION[family], head, num_labels=5)
    pixels = images()
    before = hf_classifier_parts(model, pixels)
    tokenfuse.apply(model, "tome", keep=1.0)
    for a, b in zip(before, hf_classifier_parts(model, pixels), strict=True):
        assert torch.equal(a, b)
    tokenfuse.apply(model, "tome", keep=0.5)
    logits, x = hf_classifier_parts(model, pixels)
    size = tokenfuse.token_sizes(model)
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    assert (size != 1).any()
    if head.startswith("ViT"):  # [CLS] alone
        pooled = x[:, 0]
    else:
        pooled = torch.cat([x[:, 0], pool_mean(x[:, prefix:], size[:, prefix:])], -1)
    with torch.inference_mode():  # the classifier by hand: the hooked one takes only the model's pooling
        want = torch.nn.functional.linear(pooled, model.classifier.weight, model.classifier.bias)
    assert torch.allclose(logits, want, atol=1e-6)


# 4. the engine's mask reaches the attention, in every configuration


def build(family, attn):
    return (MODELS if family in MODELS else VISION)[family](attn)


def reduced_outputs(model, family, tokenizer, texts, **options):
    tokenfuse.apply(model, "tome", keep=0.5, **options)
    if family in MODELS:
        with torch.inference_mode():
            return model(**text_inputs(tokenizer, texts)).last_hidden_state
    with torch.inference_mode():
        if hasattr(model, "forward_features"):  # timm
            return model.forward_features(images())
        if hasattr(model, "get_image_features"):  # CLIPModel, SiglipModel
            return model.get_image_features(pixel_values=images())[0]
        return model(pixel_values=images())[0]


CONFIGURATIONS = [*sorted(MODELS), *sorted(VISION)]


def hooks_of(model) -> list:
    return [h for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values()]


@pytest.mark.parametrize("family", CONFIGURATIONS)
def test_every_hook_an_adapter_installs_is_timed(family, tokenizer, texts):
    """The bench's overhead column reads `overhead_seconds`: every hook the patch adds must count in
    it (the decisions too, which it includes)."""
    model = build(family, "sdpa")
    bare = {id(h) for h in hooks_of(model)}
    tokenfuse.apply(model, "tome", keep=0.5, similarity="keys")  # keys: the projection hooks too
    added = [h for h in hooks_of(model) if id(h) not in bare]
    patch = tokenfuse.patch_of(model)
    assert len(added) > patch.num_layers
    timer = patch._timer(print).func  # the timer it installs (in the default mode, outside torch.compile)
    assert all(isinstance(h, functools.partial) and h.func == timer for h in added)
    reduced_outputs(model, family, tokenizer, texts, similarity="keys")
    patch = tokenfuse.patch_of(model)
    assert patch.overhead_seconds > patch.decide_seconds > 0


@pytest.mark.parametrize("family", CONFIGURATIONS)
def test_reduced_attention_receives_the_engines_mask(family, tokenizer, texts, monkeypatch):
    """Every scaled-dot-product call once tokens are reduced gets the engine's bias for the tokens of
    that moment (padding, log size); the first layer, before any reduction, gets the host's own."""
    model = build(family, "sdpa")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def spy(q, k, v, attn_mask=None, **kw):
        tokens = tokenfuse.patch_of(model).tokens
        bias = attention_bias(tokens, q.dtype, True)
        if attn_mask is not None and attn_mask.shape[-2] > 1 and tokens.origin is not None:
            # a local layer (ModernBERT): the same bias, within its window (test_modernbert)
            bias = window_bias(bias, tokens.origin, model.config.sliding_window)
        calls.append((attn_mask, bias))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    reduced_outputs(model, family, tokenizer, texts, similarity="keys")  # reduces after layer 0
    assert len(calls) == len(tokenfuse.patch_of(model).trace)
    n0 = calls[0][1].shape[-1]
    if family in VISION:  # no padding: the host passes no mask
        assert calls[0][0] is None
    for mask, bias in calls[1:]:
        assert bias.shape[-1] < n0 and mask is not None
        assert torch.equal(mask.expand_as(bias), bias)


@pytest.mark.parametrize("family", CONFIGURATIONS)
def test_eager_attention_uses_the_mask_sdpa_uses(family, tokenizer, texts):
    eager = reduced_outputs(build(family, "eager"), family, tokenizer, texts)
    sdpa = reduced_outputs(build(family, "sdpa"), family, tokenizer, texts)
    assert eager.shape == sdpa.shape
    assert torch.allclose(eager, sdpa, atol=1e-5), (eager - sdpa).abs().max()


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", CONFIGURATIONS)
def test_proportional_attention_changes_every_configuration(family, attn, tokenizer, texts):
    model = build(family, attn)
    on = reduced_outputs(model, family, tokenizer, texts)
    off = reduced_outputs(model, family, tokenizer, texts, prop_attn=False)
    assert on.shape == off.shape and not torch.allclose(on, off, atol=1e-4)
