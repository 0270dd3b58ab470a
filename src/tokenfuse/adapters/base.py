"""What every adapter shares: the token state of one forward, the method's decisions at the
reduction points, the attention mask handed to reduced layers, and the captured q, k, v.

An adapter only wires these steps to a model's modules with hooks; it never replaces a forward.

State is kept per forward. The hook that starts a pass opens a fresh `Forward` (token state,
per-layer trace, captured q, k, v) and puts it in a per-thread slot; every later hook of the pass
reads it from there, and the last layer closes it. Two threads calling one patched model at once
therefore never see each other's tokens, and a pass never reads a stale one. Hooks firing outside
a pass (a layer called on its own) find no open state and leave the layer unreduced. The calling
thread's last forward stays readable (`tokens`, `trace`, `layer_tokens`), for the api and the bench.
Hooks are bound methods or partials of them, never closures: `copy.deepcopy` and pickle carry them
over to the copy's own Patch, whose per-thread slots start empty.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..core import Tokens, attention_bias, reduce
from ..core.tokens import take_along
from ..methods import LayerInput, Method
from .protocol import no_kept


@dataclass(eq=False)
class Forward:
    """The state of one forward pass, seen by that pass's hooks only.

    tokens: the token state after the latest reduction; None until the pass knows its padding.
    n0: (B,) real tokens at the start, the base of the schedule's fractions. width: the padded
    length at the start, the base of static mode's widths.
    trace: per layer, (tokens entering it, tokens after its reduction), for the work accounting.
    qkv: the current layer's per-head q, k, v (B, H, N, D), until a reduction point consumes them.
    reduced: whether tokens were reduced (from then on layers attend with the engine's mask).
    """

    tokens: Tokens | None = None
    n0: Tensor | None = None
    width: int = 0
    trace: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    qkv: dict[str, Tensor] = field(default_factory=dict)
    reduced: bool = False


class Hooks:
    """Hooks installed on one model, and the per-thread slots of its passes; `remove()` takes every
    hook away. For the bench, by every forward of every thread: decide_seconds, the time spent in
    the method's decisions; overhead_seconds, the time spent in the hooks installed by `before` and `after`
    (decisions included): what tokenfuse adds to the host model's own layers. Neither is kept while
    torch.compile traces (a timer would split its graph). `state_type` is what a pass keeps."""

    state_type: ClassVar[type] = Forward

    def __init__(self) -> None:
        self.decide_seconds = 0.0
        self.overhead_seconds = 0.0
        self._handles: list[RemovableHandle] = []
        self._new_slots()

    def _new_slots(self) -> None:
        """Per-thread slots (open and last forward) and the lock on the shared timer: they belong
        to this object, so a copy or an unpickled patch gets fresh ones."""
        self._local = threading.local()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_local"], state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._new_slots()

    def hold(self, *handles: RemovableHandle) -> None:
        self._handles.extend(handles)

    def before(self, module: nn.Module, hook, kwargs: bool = False, first: bool = True) -> None:
        """Install `hook` as a forward pre-hook of `module`, clocked and held. first: ahead of the
        hooks already there (transformers' output capturing reads what tokenfuse changed)."""
        self.hold(module.register_forward_pre_hook(self._timer(hook), with_kwargs=kwargs, prepend=first))

    def after(self, module: nn.Module, hook, kwargs: bool = False, first: bool = True) -> None:
        """Install `hook` as a forward hook of `module`, clocked and held (see `before`)."""
        self.hold(module.register_forward_hook(self._timer(hook), with_kwargs=kwargs, prepend=first))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def open(self):
        """A pass starts: its own state, open in this thread until its last layer closes it."""
        fwd = self.state_type()
        self._local.current = self._local.last = fwd
        return fwd

    def current(self):
        """This thread's open pass, or None outside a pass."""
        return getattr(self._local, "current", None)

    def close(self, module: nn.Module, args: tuple, out) -> None:
        """Forward hook on the last layer: the pass ends (its captured q, k, v are let go)."""
        fwd = self.current()
        if fwd is not None:
            fwd.qkv = {}
            self._local.current = None

    @property
    def last(self):
        """This thread's last forward (the open one while a pass runs)."""
        return getattr(self._local, "last", None)

    def timed(self, decide, inp):
        """decide(inp), its time added to decide_seconds."""
        if torch.compiler.is_compiling():
            return decide(inp)
        start = time.perf_counter()
        out = decide(inp)
        seconds = time.perf_counter() - start
        with self._lock:
            self.decide_seconds += seconds
        return out

    def _timer(self, hook) -> partial:
        """The hook, its time added to overhead_seconds."""
        return partial(self._clocked, hook)

    def _clocked(self, hook, *args, **kwargs):
        if torch.compiler.is_compiling():
            return hook(*args, **kwargs)
        start = time.perf_counter()
        try:
            return hook(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - start
            with self._lock:
                self.overhead_seconds += seconds


class Patch(Hooks):
    """Token reduction installed in one transformer's layers. tokens, trace, layer_tokens(): the
    calling thread's last forward. default_min_tokens: the floor a method's `min_tokens=None`
    means on this kind of model (`reduce_at`)."""

    default_min_tokens: ClassVar[int] = 0

    def __init__(self, model: nn.Module, method: Method, num_layers: int, num_heads: int, has_cls: bool):
        super().__init__()
        self.model = model
        self.method = method
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.has_cls = has_cls
        self.schedule = method.schedule_for(num_layers)
        self.wants_attention = bool(method.needs & method.ATTENTION_INPUTS)
        self.tracks_origin = False  # set by adapters whose host reads positions after the embeddings
        #: how many tokens every sequence protects, known before any input (static mode's margin)
        self.fixed_protected = 0
        self.min_tokens = self.default_min_tokens if method.min_tokens is None else method.min_tokens

    @property
    def tokens(self) -> Tokens | None:
        """Token state after this thread's last forward; None before one."""
        return None if self.last is None else self.last.tokens

    @property
    def trace(self) -> list[tuple[Tensor, Tensor]]:
        return [] if self.last is None else self.last.trace

    def layer_tokens(self) -> Tensor:
        """(L, 2, B) this thread's last forward: tokens entering each layer and after its reduction."""
        return torch.stack([torch.stack(pair) for pair in self.trace])

    def kept(self) -> list[Tensor]:
        raise no_kept("token method")

    def begin(self, fwd: Forward, mask: Tensor, protected: Tensor) -> None:
        """The pass knows its padding: every real token stands for itself."""
        fwd.tokens = Tokens.start(
            mask, protected, track_source=self.method.track_source, track_origin=self.tracks_origin
        )
        fwd.n0 = fwd.tokens.count
        fwd.width = mask.shape[1]

    def enter(self, fwd: Forward, dtype: torch.dtype) -> Tensor | None:
        """A layer starts: the engine's attention mask once tokens were reduced, else None (the
        host's own mask, untouched, so that keep 1.0 is bit-identical)."""
        fwd.trace.append((fwd.tokens.count, fwd.tokens.count))
        if not fwd.reduced:
            return None
        return attention_bias(fwd.tokens, dtype, self.method.prop_attn)

    def _keep(self, name: str, module: nn.Module, args: tuple, out: Tensor) -> None:
        """Forward hook for a projection: keep its per-head output as q, k or v ("qkv": fused)."""
        fwd = self.current()
        if fwd is None:
            return
        B, N, _ = out.shape
        heads = out.view(B, N, -1, self.num_heads, out.shape[-1] // self.num_heads // len(name))
        for i, part in enumerate(name):
            fwd.qkv[part] = heads[:, :, i].transpose(1, 2)

    def reduce_at(self, fwd: Forward, point: int, x: Tensor) -> Tensor | None:
        """Let the method decide at reduction point `point` and apply it; None if nothing to do.

        Each sequence keeps the schedule's fraction of its starting tokens, but never fewer than
        `min_tokens` (all of its tokens if it has fewer) nor than its protected ones.

        Static mode (`Method.static`) reads nothing back from the tensors: each point runs, and the
        reduced width is ceil(starting width * fraction), which holds every sequence's target, plus
        the protected tokens (a method may fall short of a target by those it must leave alone,
        on very short sequences: [CLS] x [SEP] cannot be merged further), or min_tokens if more,
        at most the starting width (fractions do not increase, so neither do the widths). A
        sequence that still does not fit stops with an error on the device (`core.reduce`)."""
        fraction = self.schedule[point]
        if fraction >= 1.0:
            return None
        static = self.method.static
        tokens = fwd.tokens
        floor = torch.maximum(tokens.protected.sum(-1), fwd.n0.clamp_max(self.min_tokens))
        target = torch.maximum(torch.ceil(fwd.n0 * fraction).long(), floor)
        remove = (tokens.count - target).clamp_min(0)
        if not static and not bool(remove.any()):
            return None
        # from the starting width alone (never from the current one): widths stay one expression
        # of it deep, which torch.compile's dynamic shapes simplify quickly
        width = None
        if static:
            width = min(
                fwd.width, max(math.ceil(fwd.width * fraction) + self.fixed_protected, self.min_tokens)
            )
        qkv = fwd.qkv
        if not fwd.reduced:
            x, tokens, qkv = right_padded(x, tokens, qkv, always=static)
        inp = LayerInput(
            point=point,
            x=x,
            tokens=tokens,
            remove=remove,
            num_layers=self.num_layers,
            prop_attn=self.method.prop_attn,
            has_cls=self.has_cls,
            **qkv,
        )
        fwd.qkv = {}
        red = self.timed(self.method.decide, inp)
        x, fwd.tokens = reduce(x, tokens, red, width)
        fwd.reduced = True
        if point > 0:
            fwd.trace[-1] = (fwd.trace[-1][0], fwd.tokens.count)
        return x


def right_padded(
    x: Tensor, tokens: Tokens, qkv: dict[str, Tensor], always: bool = False
) -> tuple[Tensor, Tokens, dict[str, Tensor]]:
    """A left-padded batch laid out as a right-padded one: the real tokens of each sequence moved,
    in order, ahead of its padding, in the features (B, N, C), the token state and the captured
    q, k, v (B, H, N, D). Methods then see every sequence as it would be alone (ToMe's split reads
    positions). Exact (a gather); nothing before the first reduction depends on where padding sits,
    since the host's layers see positions only through their embeddings and the mask. always: move
    them without first reading whether any row is left-padded (static mode; a right-padded batch
    stays as it is)."""
    mask = tokens.mask
    if not always and not left_padded(mask):
        return x, tokens, qkv
    order = ahead(mask)
    return (
        take_along(x, order),
        tokens.take(order),
        {name: take_along(t, order, 2) for name, t in qkv.items()},
    )


def left_padded(mask: Tensor) -> bool:
    """Whether a row of the padding mask (B, N) has a real token after padding (one host sync)."""
    return bool((mask[:, 1:] & ~mask[:, :-1]).any())


def ahead(chosen: Tensor) -> Tensor:
    """(B, N) per row, the permutation that puts the chosen positions first, each group in its order."""
    return (~chosen).to(torch.uint8).argsort(dim=-1, stable=True)


def check_attention(model: nn.Module) -> None:
    """Hugging Face models: the engine's mask works with the sdpa and eager attention only."""
    impl = getattr(model.config, "_attn_implementation", "eager")
    if impl not in ("eager", "sdpa"):
        raise ValueError(
            f"tokenfuse needs the 'sdpa' or 'eager' attention implementation, the model uses {impl!r}; "
            "load it with attn_implementation='sdpa'"
        )


def argument(args: tuple, kwargs: dict, name: str, index: int):
    """A call's argument given by keyword `name` or at position `index`; None if not given."""
    if name in kwargs or len(args) <= index:
        return kwargs.get(name)
    return args[index]


def with_mask(args: tuple, kwargs: dict, name: str, mask: Tensor) -> tuple[tuple, dict]:
    """A layer's call with its attention mask (second argument, or keyword `name`) replaced."""
    return with_argument(args, kwargs, name, 1, mask)


def with_argument(args: tuple, kwargs: dict, name: str, index: int, value) -> tuple[tuple, dict]:
    """A call with its argument given by keyword `name` or at position `index` replaced by value."""
    if name in kwargs or len(args) <= index:
        return args, {**kwargs, name: value}
    return (*args[:index], value, *args[index + 1 :]), kwargs


def pairs_at(t: Tensor, index: Tensor) -> Tensor:
    """(B|1, H, N, N) a per-position-pair tensor (attention mask, position bias), (B, M) positions
    -> (B, H, M, M) its entries between those positions, row and column."""
    B, M = index.shape
    H = t.shape[1]
    rows = t.expand(B, -1, -1, -1).gather(2, index[:, None, :, None].expand(-1, H, -1, t.shape[3]))
    return rows.gather(3, index[:, None, None, :].expand(-1, H, M, -1))


def first(out):
    """The hidden states of a module output that may be a tuple."""
    return out[0] if isinstance(out, tuple) else out


def replace_first(out, x: Tensor):
    return (x, *out[1:]) if isinstance(out, tuple) else x
