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
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..engine import Tokens, attention_bias, reduce
from ..methods import LayerInput, Method


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


class TextPatch:
    """Token reduction installed on one Hugging Face encoder; `remove()` takes every hook away."""

    def __init__(self, model: nn.Module, family: Family, method: Method, protect_ids: Sequence[int] = ()):
        impl = getattr(model.config, "_attn_implementation", "eager")
        if impl not in ("eager", "sdpa"):
            raise ValueError(
                f"tokenfuse needs the 'sdpa' or 'eager' attention implementation, the model uses {impl!r}; "
                "load it with attn_implementation='sdpa'"
            )
        if "cls_attention" in method.needs and not family.has_cls:
            raise ValueError(
                f"{method.name} scores tokens by [CLS] attention, and {family.name} models have no [CLS] "
                "token; choose a method that does not (see `tokenfuse methods`)"
            )
        self.model = model
        self.family = family
        self.method = method
        self.base = model.base_model
        self.layers = self.base.get_submodule(family.layers)
        self.schedule = method.schedule_for(len(self.layers))
        self.num_heads = model.config.num_attention_heads
        self.protect_ids = torch.tensor(sorted(set(protect_ids)), dtype=torch.long)
        self._signature = inspect.signature(self.base.forward)
        self.tokens: Tokens | None = None
        self.trace: list[tuple[Tensor, Tensor]] = []
        self._qkv: dict[str, Tensor] = {}
        self.decide_seconds = 0.0  # time spent in the method's decisions, for the bench
        self._n0: Tensor | None = None

        embeddings = self.base.get_submodule(family.embeddings)
        self._handles = [
            self.base.register_forward_pre_hook(self._start, with_kwargs=True),
            embeddings.register_forward_hook(self._reduce_hook(0)),
        ]
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._enter, with_kwargs=True))
            block = layer.get_submodule(family.merge_after)
            self._handles.append(block.register_forward_hook(self._reduce_hook(i + 1)))
            if method.needs & method.ATTENTION_INPUTS:
                for name, path in zip("qkv", family.qkv, strict=True):
                    projection = layer.get_submodule(path)
                    self._handles.append(projection.register_forward_hook(self._keeper(name)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

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
        self.tokens = Tokens.start(mask, protected, track_source=self.method.track_source)
        self._n0 = count
        self._reduced = False
        self._qkv = {}
        self.trace = []

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self.trace.append((self.tokens.count, self.tokens.count))
        if not self._reduced:
            return None
        bias = attention_bias(self.tokens, args[0].dtype, self.method.prop_attn)
        if "attention_mask" in kwargs or len(args) < 2:
            return args, {**kwargs, "attention_mask": bias}
        return (args[0], bias, *args[2:]), kwargs

    def _keeper(self, name: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            B, N, _ = out.shape
            self._qkv[name] = out.view(B, N, self.num_heads, -1).transpose(1, 2)

        return hook

    def _reduce_hook(self, point: int):
        fraction = self.schedule[point]

        def hook(module: nn.Module, args: tuple, out):
            if fraction >= 1.0:
                return None
            tokens = self.tokens
            floor = tokens.protected.sum(-1)
            target = torch.maximum(torch.ceil(self._n0 * fraction).long(), floor)
            remove = (tokens.count - target).clamp_min(0)
            if not bool(remove.any()):
                return None
            x = out[0] if isinstance(out, tuple) else out
            start = time.perf_counter()
            inp = LayerInput(
                point=point,
                x=x,
                tokens=tokens,
                remove=remove,
                num_layers=len(self.layers),
                prop_attn=self.method.prop_attn,
                has_cls=self.family.has_cls,
                **self._qkv,
            )
            self._qkv = {}
            red = self.method.decide(inp)
            self.decide_seconds += time.perf_counter() - start
            x, self.tokens = reduce(x, tokens, red)
            self._reduced = True
            if point > 0:
                self.trace[-1] = (self.trace[-1][0], self.tokens.count)
            return (x, *out[1:]) if isinstance(out, tuple) else x

        return hook
