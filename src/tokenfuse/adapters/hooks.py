"""Hook plumbing every adapter shares: installing forward hooks that are clocked and held (so that
`remove()` takes every one away), the per-thread slots of a model's passes, pickling and deep copies,
and helpers that read or replace a hooked call's arguments and outputs.

State is kept per pass. The hook that starts a pass opens a fresh state object (`state_type`) and
puts it in a per-thread slot; every later hook of the pass reads it from there, and the pass's last
hook closes it. Two threads calling one patched model at once therefore never see each other's
state, and a pass never reads a stale one. Hooks firing outside a pass (a layer called on its own)
find no open state and leave the layer as it is. The calling thread's last pass stays readable
(`last`), for the api and the bench. Hooks are bound methods or partials of them, never closures:
`copy.deepcopy` and pickle carry them over to the copy's own patch, whose per-thread slots start empty.
"""

from __future__ import annotations

import threading
import time
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class Hooks:
    """Hooks installed on one model, and the per-thread slots of its passes; `remove()` takes every
    hook away. For the bench, by every forward of every thread: decide_seconds, the time spent in
    the method's decisions; overhead_seconds, the time spent in the hooks installed by `before` and `after`
    (decisions included): what tokenfuse adds to the host model's own layers. Neither is kept while
    torch.compile traces (a timer would split its graph): hooks that are not `traced` run outside
    its graphs, and are timed there too. `state_type` is what a pass keeps (each subclass sets it)."""

    state_type: ClassVar[type]
    #: whether torch.compile may trace the hooks into the host's graph (static mode: they read nothing
    #: back); otherwise they run outside it (`_outside`)
    traced: bool = True

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
        """The hook, its time added to overhead_seconds; outside torch.compile's graphs unless `traced`."""
        return partial(self._clocked if self.traced else self._outside, hook)

    def _clocked(self, hook, *args, **kwargs):
        if torch.compiler.is_compiling():
            return hook(*args, **kwargs)
        start, hosted = time.perf_counter(), self._hosted()
        try:
            return hook(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - start - (self._hosted() - hosted)
            with self._lock:
                self.overhead_seconds += seconds

    def host(self, compute, *args, **kwargs):
        """compute(*args, **kwargs): the host model's own computation run from inside a hook (a VLM's
        tower and projector at the boundary), whose time is the host's, not tokenfuse's overhead."""
        if torch.compiler.is_compiling():
            return compute(*args, **kwargs)
        start = time.perf_counter()
        try:
            return compute(*args, **kwargs)
        finally:
            self._local.hosted = self._hosted() + time.perf_counter() - start

    def _hosted(self) -> float:
        """Seconds this thread has spent in `host` calls so far."""
        return getattr(self._local, "hosted", 0.0)

    _eager = torch.compiler.disable(_clocked)

    @torch.compiler.disable(recursive=False)
    def _outside(self, hook, *args, **kwargs):
        """`_clocked`, never traced by torch.compile. Traced, a hook that reads a count back from the
        tensors splits the graph inside code every hook shares (this timer, the engine), whose resumed
        frames guard on the hook and its arguments and recompile at each hook. Run eagerly instead, it
        splits the graph at the hooked module's call, and the host's code between hooks compiles once
        for all layers: the tensors a hook sees and hands on, whose sizes change from layer to layer,
        are marked dynamic before that code first compiles (only under torch.compile: in eager mode
        this is `_clocked`)."""
        if not _compiled_around():
            return self._clocked(hook, *args, **kwargs)
        out = self._eager(hook, *args, **kwargs)
        for t in _tensors((args, kwargs, out)):
            torch._dynamo.maybe_mark_dynamic(t, tuple(range(t.dim())))
        return out


#: dynamo's frame callback: set while a torch.compile'd call runs (its eager parts included)
_frame_callback = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
_frame_callback = getattr(_frame_callback, "get_eval_frame_callback", lambda: True)


def _compiled_around() -> bool:
    """Whether this eager code runs inside a torch.compile'd call (always, where torch cannot say)."""
    return _frame_callback() is not None


def _tensors(value):
    """The tensors in a hook's arguments or result (nested tuples, lists and dicts)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


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


def first(out):
    """The hidden states of a module output that may be a tuple."""
    return out[0] if isinstance(out, tuple) else out


def replace_first(out, x: Tensor):
    return (x, *out[1:]) if isinstance(out, tuple) else x
