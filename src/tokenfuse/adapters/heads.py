"""Vision heads that pool tokens, made to weigh each reduced token by the inputs it stands for.

A head that averages the final tokens (timm `global_pool='avg'` / `'avgmax'`, the Hugging Face
DINOv2, CLIP and SigLIP classifiers' mean of patch tokens) would count a token merged from ten
patches once, and a padding slot (per-input budgets) as a token; `'max'` would see padding;
attention pooling (timm's `'map'`, SigLIP's `SiglipMultiheadAttentionPoolingHead`, which gives
SiglipModel its image embedding) would attend without sizes or padding. Hooks only:
  - the final tokens are kept as they leave the last norm (CLIP: the encoder, which has none);
  - where the head receives the pooled vector, it is recomputed: the size-weighted mean (and the max
    over real tokens) of the same tokens the host pooled, prefix tokens excluded as the host does;
  - an attention pool gets the engine's attention mask (padding, log size when proportional), so a
    token merged from k identical ones weighs as the k did.
The host's own pooling of the kept tokens is recomputed first and must be what the head received,
so tokens from another call are never substituted. While every token stands for itself the host's
result is left untouched (keep 1.0 is bit-identical).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core import attention_bias, pool_mean
from .engine import Patch
from .hooks import with_mask

#: Hugging Face classifiers whose input is the mean of the patch tokens: the tower's module whose
#: output those tokens are, and whether [CLS] goes ahead of the mean in the classifier's input
HF_MEAN_HEADS = {
    "Dinov2ForImageClassification": ("layernorm", True),
    "Dinov2WithRegistersForImageClassification": ("layernorm", True),
    "CLIPForImageClassification": ("encoder", False),
    "SiglipForImageClassification": ("post_layernorm", False),
}
#: Hugging Face attention-pooling heads (a learned probe attends to the final tokens), at `tower.head`
HF_ATTENTION_HEADS = ("SiglipMultiheadAttentionPoolingHead",)


def weigh_pooling(patch: Patch, model: nn.Module, tower: nn.Module, timm: bool, prefix: int) -> None:
    """Install on the patch the hooks that make the model's pooling heads read sizes; none where
    the head reads [CLS]. tower: the module holding the vision blocks (`vision_families.tower_of`)."""
    if timm:
        _TimmPooling(patch, model).install()
        return
    if type(model).__name__ in HF_MEAN_HEADS:
        _HfMeanPooling(patch, model, tower, prefix).install()
    if type(getattr(tower, "head", None)).__name__ in HF_ATTENTION_HEADS:
        _HfAttentionPooling(patch, tower).install()


def pool(x: Tensor, size: Tensor | None, kind: str) -> Tensor:
    """(B, C) the `kind` pooling ('avg', 'max', 'avgmax') of tokens x (B, N, C); weighted by size
    (B, N) with padding (size 0) left out, or, with size None, as the host computes it."""
    if size is None:
        mean, most = x.mean(1), x.amax(1)
    else:
        mean = pool_mean(x, size)
        most = x.masked_fill(size[..., None] <= 0, torch.finfo(x.dtype).min).amax(1)
    return {"avg": mean, "max": most, "avgmax": 0.5 * (most + mean)}[kind]


class _Pooling:
    """Hooks on one model's pooling head. The final tokens are kept on the calling thread's last
    forward (`VisionForward.final`), never on this object, so concurrent calls do not mix; the hooks
    are bound methods, so deepcopy and pickle carry them to the copy's own patch."""

    def __init__(self, patch: Patch):
        self.patch = patch

    def keep(self, module: nn.Module, args: tuple, out) -> None:
        fwd = self.patch.last
        if fwd is not None:
            fwd.final = out if isinstance(out, Tensor) else out[0]  # a tuple or a ModelOutput

    def tokens(self, skip: int) -> tuple[Tensor, Tensor] | None:
        """(tokens (B, N, C), sizes (B, N)) after the first `skip`, or None while nothing was reduced."""
        fwd = self.patch.last
        x = None if fwd is None else fwd.final
        size = None if fwd is None else fwd.tokens.size
        if x is None or x.shape[:2] != size.shape:
            raise RuntimeError(
                "the pooling head got tokens that are not the patched model's last forward output; "
                "call the model (or forward_features) on the images before its head"
            )
        if bool((size == 1).all()):
            return None
        return x[:, skip:], size[:, skip:]

    def repool(self, pooled: Tensor, skip: int, kind: str) -> Tensor | None:
        """The size-weighted pooling in place of the host's `pooled` (B, C), None if unchanged."""
        found = self.tokens(skip)
        if found is None:
            return None
        x, size = found
        if not torch.equal(pool(x, None, kind), pooled):
            raise RuntimeError(
                "the pooling head's input is not the pooling of the patched model's last output; "
                "call the model (or forward_features) on the images before its head"
            )
        return pool(x, size, kind)

    def attention_mask(self, skip: int) -> Tensor | None:
        """(B, 1, 1, N) the engine's mask over the final tokens after the first `skip`, in their
        dtype, for an attention pool; None while nothing was reduced."""
        found = self.tokens(skip)
        if found is None:
            return None
        patch = self.patch
        return attention_bias(patch.tokens, found[0].dtype, patch.method.prop_attn)[..., skip:]


class _TimmPooling(_Pooling):
    """timm VisionTransformer: `pool` runs between `norm` and `fc_norm`, and `attn_pool` ('map')."""

    def __init__(self, patch: Patch, model: nn.Module):
        super().__init__(patch)
        self.model = model

    def install(self) -> None:
        model, patch = self.model, self.patch
        patch.after(model.norm, self.keep)
        patch.before(model.fc_norm, self.before_fc_norm)
        if model.attn_pool is not None:
            patch.before(model.attn_pool, self.before_attn_pool, kwargs=True)

    def skip(self) -> int:
        return 0 if self.model.pool_include_prefix else self.model.num_prefix_tokens

    def before_fc_norm(self, module: nn.Module, args: tuple):
        model = self.model
        if model.global_pool not in ("avg", "avgmax", "max") or model.attn_pool is not None:
            return None
        pooled = self.repool(args[0], self.skip(), model.global_pool)
        return None if pooled is None else (pooled, *args[1:])

    def before_attn_pool(self, module: nn.Module, args: tuple, kwargs: dict):
        bias = self.attention_mask(self.skip())
        return None if bias is None else with_mask(args, kwargs, "attn_mask", bias)


class _HfMeanPooling(_Pooling):
    """The classifier's input is the mean of the patch tokens (B, C), with [CLS] (B, C) ahead of it
    where `HF_MEAN_HEADS` says so."""

    def __init__(self, patch: Patch, model: nn.Module, tower: nn.Module, prefix: int):
        super().__init__(patch)
        self.model, self.tower, self.prefix = model, tower, prefix
        self.final, self.with_cls = HF_MEAN_HEADS[type(model).__name__]

    def install(self) -> None:
        self.patch.after(self.tower.get_submodule(self.final), self.keep)
        self.patch.before(self.model.classifier, self.before_classifier)

    def before_classifier(self, module: nn.Module, args: tuple):
        cls, mean = args[0].chunk(2, dim=-1) if self.with_cls else (None, args[0])
        pooled = self.repool(mean, self.prefix, "avg")
        if pooled is None:
            return None
        return (pooled if cls is None else torch.cat([cls, pooled], dim=-1), *args[1:])


class _HfAttentionPooling(_Pooling):
    """SigLIP's head: `nn.MultiheadAttention(probe, x, x)` over the last norm's output x (B, N, C),
    given the engine's mask as its float `attn_mask` (B * heads, 1, N)."""

    def __init__(self, patch: Patch, tower: nn.Module):
        super().__init__(patch)
        self.tower = tower

    def install(self) -> None:
        self.patch.after(self.tower.post_layernorm, self.keep)
        self.patch.before(self.tower.head.attention, self.before_attention, kwargs=True)

    def before_attention(self, module: nn.MultiheadAttention, args: tuple, kwargs: dict):
        bias = self.attention_mask(0)
        if bias is None:
            return None
        B, N = bias.shape[0], bias.shape[-1]
        mask = bias.expand(B, module.num_heads, 1, N).reshape(B * module.num_heads, 1, N)
        return args, {**kwargs, "attn_mask": mask}
