"""Hugging Face text encoders (BERT family).

The adapter adds hooks and never replaces a forward: the host model's own attention, norms,
residuals and dropout run unchanged, so a new transformers release cannot silently lose a piece of
the computation. The hooks:
  - before the model: read the padding mask and input ids, start the token state;
  - at each reduction point, after the embeddings and after each layer's attention block: let the
    method decide, and apply its reduction;
  - before each layer: once tokens were reduced, hand the layer the engine's attention mask
    (padding, plus log size for proportional attention);
  - on the query, key and value projections, only for methods that read attention.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..methods import Method
from . import checks
from .base import Patch, check_attention, first, replace_first, with_mask


@dataclass(frozen=True)
class Family:
    """Where one family of encoders keeps its embeddings and layers, the block after which tokens
    are reduced (its output is what the MLP consumes) and the query, key, value projections."""

    name: str
    model_types: tuple[str, ...]
    embeddings: str
    layers: str
    merge_after: str
    qkv: tuple[str, str, str]
    has_cls: bool = True  # position 0 is a [CLS]-like summary token


FAMILIES = (
    Family(
        "bert",
        ("bert", "roberta", "xlm-roberta"),
        embeddings="embeddings",
        layers="encoder.layer",
        merge_after="attention",
        qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
    ),
    Family(
        "distilbert",
        ("distilbert",),
        embeddings="embeddings",
        layers="transformer.layer",
        merge_after="sa_layer_norm",
        qkv=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
    ),
)


def family_of(model: nn.Module) -> Family | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def supported() -> list[str]:
    return [t for f in FAMILIES for t in f.model_types]


class TextPatch(Patch):
    """Token reduction installed on one Hugging Face encoder."""

    def __init__(self, model: nn.Module, family: Family, method: Method, protect_ids: Sequence[int] = ()):
        check_attention(model)
        checks.check_text(model)
        if "cls_attention" in method.needs and not family.has_cls:
            raise ValueError(
                f"{method.name} scores tokens by [CLS] attention, and {family.name} models have no [CLS] "
                "token; choose a method that does not (see `tokenfuse methods`)"
            )
        base = model.base_model
        layers = base.get_submodule(family.layers)
        super().__init__(model, method, len(layers), model.config.num_attention_heads, family.has_cls)
        self.family = family
        self.protect_ids = torch.tensor(sorted(set(protect_ids)), dtype=torch.long)
        self._signature = inspect.signature(base.forward)

        self.hold(
            base.register_forward_pre_hook(self._start, with_kwargs=True),
            base.get_submodule(family.embeddings).register_forward_hook(self._reduce_hook(0)),
        )
        for i, layer in enumerate(layers):
            self.hold(
                layer.register_forward_pre_hook(self._enter, with_kwargs=True),
                layer.get_submodule(family.merge_after).register_forward_hook(self._reduce_hook(i + 1)),
            )
            if self.wants_attention:
                for name, path in zip("qkv", family.qkv, strict=True):
                    self.hold(layer.get_submodule(path).register_forward_hook(self.keeper(name)))

    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        ids, embeds, mask = bound.get("input_ids"), bound.get("inputs_embeds"), bound.get("attention_mask")
        shape = ids.shape if ids is not None else embeds.shape[:2]
        device = ids.device if ids is not None else embeds.device
        mask = torch.ones(shape, dtype=torch.bool, device=device) if mask is None else mask.bool()
        count = mask.sum(-1)
        positions = torch.arange(shape[1], device=device)
        # [CLS] and [SEP]: the first and the last real token of each sequence.
        protected = (positions == 0) | (positions == count[:, None] - 1)
        if ids is not None and len(self.protect_ids):
            protected |= torch.isin(ids, self.protect_ids.to(device))
        self.begin(mask, protected)

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        bias = self.enter(args[0].dtype)
        return None if bias is None else with_mask(args, kwargs, "attention_mask", bias)

    def _reduce_hook(self, point: int):
        def hook(module: nn.Module, args: tuple, out):
            x = self.reduce_at(point, first(out))
            return None if x is None else replace_first(out, x)

        return hook
