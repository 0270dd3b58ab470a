"""What every adapter shares: the token state of one forward, the method's decisions at the
reduction points, the attention mask handed to reduced layers, and the captured q, k, v.

An adapter only wires these steps to a model's modules with hooks; it never replaces a forward.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..core import Tokens, attention_bias, reduce
from ..methods import LayerInput, Method


class Patch:
    """Token reduction installed on one model; `remove()` takes every hook away.

    trace: per layer, (tokens entering it, tokens after its reduction), for the work accounting.
    decide_seconds: time spent in the method's decisions, for the bench.
    """

    def __init__(self, model: nn.Module, method: Method, num_layers: int, num_heads: int, has_cls: bool):
        self.model = model
        self.method = method
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.has_cls = has_cls
        self.schedule = method.schedule_for(num_layers)
        self.wants_attention = bool(method.needs & method.ATTENTION_INPUTS)
        self.tokens: Tokens | None = None
        self.trace: list[tuple[Tensor, Tensor]] = []
        self.decide_seconds = 0.0
        self._handles: list[RemovableHandle] = []
        self._qkv: dict[str, Tensor] = {}
        self._n0: Tensor | None = None
        self._reduced = False

    def hold(self, *handles: RemovableHandle) -> None:
        self._handles.extend(handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def begin(self, mask: Tensor, protected: Tensor) -> None:
        """A new forward: every real token stands for itself."""
        self.tokens = Tokens.start(mask, protected, track_source=self.method.track_source)
        self._n0 = self.tokens.count
        self._reduced = False
        self._qkv = {}
        self.trace = []

    def enter(self, dtype: torch.dtype) -> Tensor | None:
        """A layer starts: the engine's attention mask once tokens were reduced, else None (the
        host's own mask, untouched, so that keep 1.0 is bit-identical)."""
        self.trace.append((self.tokens.count, self.tokens.count))
        if not self._reduced:
            return None
        return attention_bias(self.tokens, dtype, self.method.prop_attn)

    def layer_tokens(self) -> Tensor:
        """(L, 2, B) the last forward's trace: tokens entering each layer and after its reduction."""
        return torch.stack([torch.stack(pair) for pair in self.trace])

    def keeper(self, name: str):
        """Forward hook on a projection: keep its per-head output as q, k or v ("qkv": fused)."""

        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            B, N, _ = out.shape
            heads = out.view(B, N, -1, self.num_heads, out.shape[-1] // self.num_heads // len(name))
            for i, part in enumerate(name):
                self._qkv[part] = heads[:, :, i].transpose(1, 2)

        return hook

    def reduce_at(self, point: int, x: Tensor) -> Tensor | None:
        """Let the method decide at reduction point `point` and apply it; None if nothing to do."""
        fraction = self.schedule[point]
        if fraction >= 1.0:
            return None
        tokens = self.tokens
        floor = tokens.protected.sum(-1)
        target = torch.maximum(torch.ceil(self._n0 * fraction).long(), floor)
        remove = (tokens.count - target).clamp_min(0)
        if not bool(remove.any()):
            return None
        start = time.perf_counter()
        inp = LayerInput(
            point=point,
            x=x,
            tokens=tokens,
            remove=remove,
            num_layers=self.num_layers,
            prop_attn=self.method.prop_attn,
            has_cls=self.has_cls,
            **self._qkv,
        )
        self._qkv = {}
        red = self.method.decide(inp)
        self.decide_seconds += time.perf_counter() - start
        x, self.tokens = reduce(x, tokens, red)
        self._reduced = True
        if point > 0:
            self.trace[-1] = (self.trace[-1][0], self.tokens.count)
        return x


def check_attention(model: nn.Module) -> None:
    """Hugging Face models: the engine's mask works with the sdpa and eager attention only."""
    impl = getattr(model.config, "_attn_implementation", "eager")
    if impl not in ("eager", "sdpa"):
        raise ValueError(
            f"tokenfuse needs the 'sdpa' or 'eager' attention implementation, the model uses {impl!r}; "
            "load it with attn_implementation='sdpa'"
        )


def with_mask(args: tuple, kwargs: dict, name: str, mask: Tensor) -> tuple[tuple, dict]:
    """A layer's call with its attention mask (second argument, or keyword `name`) replaced."""
    if name in kwargs or len(args) < 2:
        return args, {**kwargs, name: mask}
    return (args[0], mask, *args[2:]), kwargs


def first(out):
    """The hidden states of a module output that may be a tuple."""
    return out[0] if isinstance(out, tuple) else out


def replace_first(out, x: Tensor):
    return (x, *out[1:]) if isinstance(out, tuple) else x
