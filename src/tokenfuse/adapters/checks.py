"""What an adapter refuses before it patches: models that its hooks would run, but wrongly.

Reduced tokens are fewer than the input's and each stands for `size` of them, with no position of
its own. That is right for an encoder read through [CLS] or a size-weighted pool, and wrong for:
  - heads with one output per input token (masked LM, token classification, question answering,
    masked image modelling, dense backbones): they would return fewer positions than the input has;
  - decoders (causal self-attention, cross-attention): the engine's mask is bidirectional;
  - attention scored by relative distances (BERT's `relative_key`, `relative_key_query`): a merged
    token's index is no longer a distance to anything;
  - timm pooling that cannot be given the sizes, and, for methods that read attention, timm attention
    layers other than `Attention` (whose q_norm / k_norm outputs the vision adapter reads in place
    of the projection's, so qk_norm models are supported);
  - methods that score tokens by [CLS] attention, on models with no [CLS] token (MPNet, SigLIP);
  - methods that read attention probabilities, on encoders with sliding-window layers (ModernBERT):
    they would compute them over every token, where the layer attends within its window;
  - classifiers that pool with the input's attention mask (ModernBERT's classifier_pooling='mean').
Each refusal names what is wrong and what to do instead; nothing is patched.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..methods import Method

#: heads that read one summary token ([CLS] pooler, [CLS] / distillation classifiers) or pool tokens
#: with the sizes (adapters.heads); every other head class on a supported family is refused
TEXT_HEADS = ("ForSequenceClassification", "ForMultipleChoice", "ForNextSentencePrediction")
VISION_HEADS = ("ForImageClassification", "ForImageClassificationWithTeacher", "VisionModelWithProjection")
#: timm pooling (`global_pool`) the vision adapter computes correctly on reduced tokens
TIMM_POOLS = ("", "token", "avg", "avgmax", "max", "map")


def check_text(model: nn.Module) -> None:
    """Hugging Face text encoders: a per-token head, a mean-pooling classifier, a decoder or
    relative positions is refused.
    (transformers 5 no longer implements BERT's relative positions and ignores the setting; a
    checkpoint configured with them was trained with them, so it is refused all the same.)"""
    config = model.config
    _check_head(model, TEXT_HEADS, "a sequence classifier (e.g. BertForSequenceClassification)")
    check_pooling(model)
    decoder = {k: getattr(config, k, False) for k in ("is_decoder", "add_cross_attention")}
    if any(decoder.values()):
        raise ValueError(
            f"this {config.model_type} model is configured as a decoder "
            f"({', '.join(f'{k}={v}' for k, v in decoder.items())}): "
            "its causal or cross-attention mask would be replaced by the bidirectional mask of reduced "
            "tokens; tokenfuse reduces encoders only: load the model with is_decoder=False"
        )
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(
            f"this model scores attention by relative positions (position_embedding_type={kind!r}): "
            "merged tokens have no position, so those distances lose their meaning; tokenfuse supports "
            "position_embedding_type='absolute' only (positions are added once, at the embeddings)"
        )


def check_cls(method: Method, has_cls: bool, models: str) -> None:
    """A method that scores by [CLS] attention needs a [CLS] token; `models` names those without."""
    if "cls_attention" in method.needs and not has_cls:
        raise ValueError(
            f"{method.name} scores tokens by [CLS] attention, and {models} have no [CLS] token; "
            "choose a method that does not (see `tokenfuse methods`)"
        )


def check_local_attention(config, method: Method, windows: list[int | None]) -> None:
    """Encoders with sliding-window layers (`windows`: per layer, its reach or None): tokenfuse
    reads the padding from the first layer's mask, which must be global, and computes a method's
    attention without windows, so methods that read attention probabilities are refused."""
    if windows[0] is not None:
        raise ValueError(
            f"this {config.model_type} model's first layer attends within a window (layer_types[0]="
            f"{config.layer_types[0]!r}), and tokenfuse reads the padding from the first layer's mask, "
            "which must be global attention's: load it with layer_types starting with 'full_attention'"
        )
    reads = sorted(method.needs & {"cls_attention", "attention"})
    if reads and any(w is not None for w in windows):
        raise ValueError(
            f"{method.name} scores tokens by the layers' attention ({', '.join(reads)}), which tokenfuse "
            f"computes over all tokens, and this {config.model_type} model's local layers attend within "
            f"{config.sliding_window} positions either side, so the scores would not be the layer's; "
            "choose a method that reads keys or hidden states (tome, pitome, see `tokenfuse methods`)"
        )


def check_pooling(model: nn.Module) -> None:
    """A classifier that averages the last hidden states with the input's attention mask (one entry
    per input token) would misread reduced tokens: refused."""
    if model.base_model is not model and getattr(model.config, "classifier_pooling", "cls") == "mean":
        raise ValueError(
            f"{type(model).__name__} with classifier_pooling='mean' averages its last hidden states with "
            "the input's attention mask, one entry per input token, and after reduction there are fewer "
            "tokens, each standing for several: load it with classifier_pooling='cls', or apply tokenfuse "
            f"to model.{model.base_model_prefix} and pool with tokenfuse.embed(pooling='mean')"
        )


def check_vision(model: nn.Module, method: Method, timm: bool) -> None:
    """Vision transformers: a dense head, an attention layer whose queries and keys are not the
    captured ones, or a pooling that ignores sizes is refused."""
    if not timm:
        example = "an image classifier (e.g. ViTForImageClassification)"
        _check_head(model, VISION_HEADS, example, backbones=True)
        return
    pool = model.global_pool
    if pool not in TIMM_POOLS:
        raise ValueError(
            f"timm pooling global_pool={pool!r} is computed over the tokens without their sizes or "
            f"padding; tokenfuse supports {', '.join(repr(p) for p in TIMM_POOLS)}: build the model with "
            "one of them, or pool `forward_features` yourself with tokenfuse.token_sizes"
        )
    attn_pool = model.attn_pool
    if attn_pool is not None and "attn_mask" not in inspect.signature(attn_pool.forward).parameters:
        raise ValueError(
            f"this timm version's attention pooling ({type(attn_pool).__name__}) takes no attention mask, "
            "so it would attend to reduced tokens without their sizes; upgrade timm, or build the model "
            "with global_pool='token' or 'avg'"
        )
    if method.needs & method.ATTENTION_INPUTS:
        kinds = sorted({type(block.attn).__name__ for block in model.blocks} - {"Attention"})
        if kinds:
            raise ValueError(
                f"{method.name} reads each layer's attention, and this model's blocks use "
                f"{', '.join(kinds)}, whose queries and keys are not those tokenfuse captures (it knows "
                "timm's Attention); choose a method that reads no attention (see `tokenfuse methods`)"
            )


def is_backbone(model: nn.Module) -> bool:
    """A transformers backbone (Dinov2Backbone): it returns feature maps, read by position."""
    return any(c.__name__ == "BackboneMixin" for c in type(model).__mro__)


def _check_head(model: nn.Module, heads: tuple[str, ...], example: str, backbones: bool = False) -> None:
    """Hugging Face models: the base model, or a head that reads [CLS] or a pooled output; with
    backbones=True also a backbone (the vision adapter maps its hidden states back to the grid)."""
    name = type(model).__name__
    backbone = is_backbone(model)
    if (model.base_model is model and (backbones or not backbone)) or name.endswith(heads):
        return
    base = "the base model (AutoModel)" if backbone else f"model.{model.base_model_prefix}"
    raise TypeError(
        f"{name} returns one output per input token (or reads the tokens by position), and after "
        "reduction there are fewer tokens than inputs, each standing for several; tokenfuse does not "
        f"patch it. Apply tokenfuse to {base} or to {example}; for per-token outputs, apply it to "
        f"{base} with track_source=True and map the reduced tokens back with tokenfuse.to_grid "
        "before the head"
    )
