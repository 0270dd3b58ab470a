"""One measurement protocol for every bench (text, vision) and for calibration (its speedup budget,
its held-out evaluation), so that a number means the same in every table:

- a warm-up pass (the full model on one batch) is discarded: first calls pay for allocations and
  kernel choices;
- timing rounds are interleaved, each round running every configuration once, so that a change of
  the machine's load spreads over all of them; the median per configuration is kept. Where a task
  can split its inputs (`parts`: a batch each), a round runs every configuration on one batch before
  the next, all of them eager PyTorch: a shared machine's speed moves within seconds, which whole
  passes in turn do not cancel (README, `tokenfuse bench`);
- the clock covers the model (and its pooling) alone: a task prepares its inputs before it starts
  (tokenized, truncated, resized, batched, on the model's device) and outputs are copied back after
  it stops; on a GPU it waits for the device at both ends;
- a configuration on another runtime than eager PyTorch (`runtime.RUNTIMES`: torch.compile, int8, ONNX
  Runtime) runs a copy of the model built for it once (`runtime.runtime_model`), which its task runs once
  over the timed inputs before timing it: compilation and export are not timed;
- speedup is the full model's median over the configuration's, from the same run; scoring is the
  share of the configuration's time spent in the method's decisions (`Patch.decide_seconds`),
  overhead the share spent in tokenfuse's hooks, decisions included (`Patch.overhead_seconds`):
  everything but the host model's own layers;
  tokens and FLOPs are per layer, relative to the full model, from the layer trace of the pass the
  quality is read from.

A task (`Task`) says how to run one configuration over its inputs and which quality columns it adds.
"""

from __future__ import annotations

import itertools
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..api import apply, patch_of, remove
from ..core.messages import did_you_mean
from ..methods import available
from ..methods.registry import Kind
from . import metrics
from .runtime import BUILT_FOR, RUNTIMES, UNTIMED_HOOKS


@dataclass(frozen=True)
class Config:
    """One configuration a bench compares: a method (or a baseline) at a keep, with options, on a
    runtime (`RUNTIMES`)."""

    method: str
    keep: float
    options: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # how results call it; the method's name unless set
    runtime: str = "eager"

    @property
    def title(self) -> str:
        """The name, "+runtime" where it runs on one that it does not name ("tome+int8")."""
        name = self.name or self.method
        return name if self.runtime in ("eager", self.method) else f"{name}+{self.runtime}"

    @property
    def label(self) -> str:
        return self.title if self.method == "full" else f"{self.title} @ {self.keep:g}"


FULL = Config("full", 1.0)


def method_names(
    spec: str, baselines: tuple[str, ...], kind: Kind = "token", extra: tuple[str, ...] = ()
) -> list[str]:
    """A comma list of method names; 'all' stands for every registered method (of `kind`) and baseline,
    `extra` names those that are accepted but not in 'all' (they need optional packages)."""
    known = [*baselines, *available(kind)]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in (*known, *extra, "all")]
    if unknown:
        choices = ", ".join(["all", *known, *extra])
        named = ", ".join(n + did_you_mean(n, known) for n in unknown)
        raise ValueError(f"unknown method(s) {named}; choose from: {choices}")
    if "all" in names:
        return known + [n for n in extra if n in names]
    return names


def configs_for(
    methods: list[str],
    keeps: list[float],
    options: dict[str, Any],
    baselines: tuple[str, ...],
    kind: Kind = "token",
) -> list[Config]:
    """The full model first, then every method at every keep; fails on a bad keep or option now,
    before any long work."""
    out = [FULL]
    for keep in keeps:
        out += [Config(m, keep, {} if m in baselines else options) for m in methods if m != "full"]
    for config in out[1:]:
        if config.method not in baselines:
            available(kind)[config.method](keep=config.keep, **config.options)
    return out


def check_positive(**values: int | None) -> None:
    """Counts a run is asked for (batch size, repeats, ...): each must be at least 1 where given."""
    for name, value in values.items():
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{name} must be at least 1, got {value}; give a positive {flag}")


@dataclass
class Pass:
    """One configuration run over a task's inputs."""

    outputs: dict[str, np.ndarray]  # name -> (inputs, ...), in input order
    layer_tokens: np.ndarray  # (inputs, layers, 2): tokens entering attention and the MLP
    seconds: float  # the model's time alone, inputs prepared beforehand
    scoring: float  # share of it spent in the method's decisions
    overhead: float = 0.0  # share of it spent in tokenfuse's hooks, decisions included
    extra: dict[str, float] = field(default_factory=dict)  # other timings of the pass: name -> seconds


Forward = Callable[[Any], tuple[dict[str, Tensor], Tensor]]


def run_pass(
    model: nn.Module,
    config: Config,
    baseline: bool,
    batches: Sequence[Any],
    forward: Forward,
    order: Sequence[int] | None = None,
    **extra: Any,
) -> Pass:
    """`config` installed on the model (nothing for a baseline: its change is in the prepared
    inputs, or it is another model), `forward` timed over the `batches`, and the model left
    unreduced; a configuration on a runtime other than eager runs its `runtime_model` as it is.
    forward(batch) gives outputs, name -> (B, ...), and the layer trace (layers, 2, B); `order` is
    the input position of each output row, for batches that do not hold the inputs in order.
    `extra`: apply's options."""
    built = config.runtime in RUNTIMES[1:]
    if built:
        if getattr(model, BUILT_FOR, None) != config.runtime:
            raise ValueError(f"{config.label} runs on {config.runtime}: pass its runtime_model")
    elif baseline:
        remove(model)
    else:
        apply(model, config.method, keep=config.keep, **extra, **config.options)
    patch = patch_of(model)
    # a runtime model's patch serves every pass: only what this one adds counts
    decided, hooked = (patch.decide_seconds, patch.overhead_seconds) if patch else (0.0, 0.0)
    try:
        with torch.inference_mode():
            _wait(model)
            start = time.perf_counter()
            results = [forward(batch) for batch in batches]
            _wait(model)
            seconds = time.perf_counter() - start
        scoring = (patch.decide_seconds - decided) / seconds if patch else 0.0
        overhead = (patch.overhead_seconds - hooked) / seconds if patch else 0.0
    finally:
        if not built:
            remove(model)
    outputs = {k: torch.cat([out[k] for out, _ in results]).float().cpu().numpy() for k in results[0][0]}
    layer_tokens = torch.cat([trace for _, trace in results], -1).permute(2, 0, 1).cpu().numpy()
    if order is not None:
        at = np.argsort(np.asarray(order))
        outputs, layer_tokens = {k: v[at] for k, v in outputs.items()}, layer_tokens[at]
    return Pass(outputs, layer_tokens, seconds, scoring, overhead)


def _wait(model: nn.Module) -> None:
    """A GPU runs asynchronously: the clock may be read only once its queued work is done."""
    parameter = next(model.parameters(), None)  # none: a model another runtime holds (onnxruntime)
    if parameter is not None and parameter.device.type == "cuda":
        torch.cuda.synchronize(parameter.device)


class Task(Protocol):
    """What a bench runs: a model, its inputs, how a configuration runs over them, its quality. A
    task whose model is not an encoder also defines `flops(pass) -> float`, which `compare` reads;
    one that can time its inputs a batch at a time defines `parts() -> [(task, positions)]`: the
    same task on each batch of its timing inputs, with their positions there, which `timings`
    interleaves."""

    name: str
    model: nn.Module

    def run(self, config: Config, warm_up: bool = False) -> Pass:
        """One pass of `config` over the timing inputs (their first batch for the warm-up)."""

    def quality_pass(self, config: Config, timed: Pass) -> Pass:
        """The pass quality and work are read from: `timed` (the first timed pass) where it serves."""

    def head(self, config: Config) -> dict[str, Any]:
        """The row's leading columns, naming what it is."""

    def columns(self, config: Config, quality: Pass, full: Pass) -> dict[str, Any]:
        """The row's quality columns, against the full model's quality pass `full`."""


def timings(
    task: Task, configs: Sequence[Config], repeats: int, step: Callable[[str], None] = lambda _: None
) -> list[list[Pass]]:
    """The warm-up, then `repeats` interleaved rounds: one list of timed passes per configuration.
    Each round runs every configuration on one of the task's `parts` in turn, then on the next (the
    whole task as one part where it has none, or a configuration runs on another runtime, whose
    model a task builds once for its inputs). step(what) is called once per configuration and round."""
    step(f"{task.name} warm-up")
    task.run(configs[0], warm_up=True)
    eager = all(c.runtime == "eager" for c in configs)
    parts = task.parts() if eager and hasattr(task, "parts") else [(task, None)]
    passes: list[list[Pass]] = [[] for _ in configs]
    for r in range(repeats):
        done: list[list[Pass]] = [[] for _ in configs]
        for j, (part, _) in enumerate(parts):
            for i, config in enumerate(configs):
                if j == 0:
                    step(f"{task.name} round {r + 1}/{repeats}: {config.label}")
                done[i].append(part.run(config))
        for i in range(len(configs)):
            passes[i].append(joined(done[i], [at for _, at in parts]))
    return passes


def spans(count: int, size: int) -> list[range]:
    """The positions of each batch of `size` among `count` inputs: a task's `parts`."""
    return [range(i, min(i + size, count)) for i in range(0, count, size)]


def joined(parts: Sequence[Pass], positions: Sequence[Sequence[int] | None]) -> Pass:
    """One pass from passes over parts of the inputs, each part's rows at its `positions` in the
    inputs (None: the whole task, whose pass it is); shares of time weighted by seconds. A single
    part is put in order too: its rows may not be (a text task's are sorted by length)."""
    if positions[0] is None:
        return parts[0]
    at = np.argsort(np.concatenate([np.asarray(p, dtype=np.int64) for p in positions]), kind="stable")
    seconds = sum(p.seconds for p in parts)
    return replace(
        parts[0],
        outputs={k: np.concatenate([p.outputs[k] for p in parts])[at] for k in parts[0].outputs},
        layer_tokens=np.concatenate([p.layer_tokens for p in parts])[at],
        seconds=seconds,
        scoring=sum(p.scoring * p.seconds for p in parts) / seconds,
        overhead=sum(p.overhead * p.seconds for p in parts) / seconds,
        extra={k: sum(p.extra[k] for p in parts) for k in parts[0].extra},
    )


def speedup(task: Task, config: Config, repeats: int) -> float:
    """The full model's median time over `config`'s on the task's inputs, as the bench measures it."""
    full, reduced = timings(task, [FULL, config], repeats)
    return statistics.median(p.seconds for p in full) / statistics.median(p.seconds for p in reduced)


def compare(task: Task, configs: list[Config], repeats: int, bar) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per configuration (the first must be the full model, which every ratio is to), and
    the notes: every warning on the way, once. bar: a rich progress bar (tokenfuse.api.progress)."""
    if configs[0].method != "full":
        raise ValueError("the first configuration must be the full model: every ratio is to it")
    progress = bar.add_task(task.name, total=1 + len(configs) * (repeats + 1))
    done = itertools.count()

    def step(what: str) -> None:
        bar.update(progress, description=what, completed=next(done))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        passes = timings(task, configs, repeats, step)
        quality = []
        for config, timed in zip(configs, passes, strict=True):
            step(f"{task.name} quality: {config.label}")
            quality.append(task.quality_pass(config, timed[0]))
        step(f"{task.name}: done")
        rows = [
            {**task.head(config), **cost, **task.columns(config, q, quality[0])}
            for config, cost, q in zip(
                configs,
                costs(task.model, configs, passes, quality, getattr(task, "flops", None)),
                quality,
                strict=True,
            )
        ]
    return rows, sorted({str(w.message) for w in caught})


def costs(
    model: nn.Module,
    configs: Sequence[Config],
    passes: list[list[Pass]],
    quality: list[Pass],
    flops: Callable[[Pass], float] | None = None,
) -> list[dict[str, Any]]:
    """What each configuration is and what it costs, relative to the first (the full model). flops:
    a pass's FLOPs, an encoder's from its layer trace unless the task counts its own; each of the
    passes' `extra` timings gives a `<name>_speedup` column."""
    if flops is None:
        hidden, inter = model.config.hidden_size, metrics.mlp_width(model.config)
        matrices = metrics.mlp_matrices(model.config)

        def flops(p: Pass) -> float:
            n = p.layer_tokens
            return metrics.encoder_flops(n[..., 0], n[..., 1], hidden, inter, mlp_matrices=matrices)

    full_seconds = statistics.median(p.seconds for p in passes[0])
    full_tokens, full_flops = quality[0].layer_tokens.mean(-1).sum(), flops(quality[0])
    out = []
    for config, timed, q in zip(configs, passes, quality, strict=True):
        seconds = statistics.median(p.seconds for p in timed)
        out.append(
            {
                "method": config.method,
                "keep": config.keep,
                "options": config.options,
                "tokens": float(q.layer_tokens.mean(-1).sum() / full_tokens),
                "flops": flops(q) / full_flops,
                "speedup": full_seconds / seconds,
                "seconds": seconds,
                **(
                    dict.fromkeys(("scoring", "overhead"))  # inside a compiled graph: not measured
                    if config.runtime in UNTIMED_HOOKS
                    else {
                        "scoring": statistics.median(p.scoring for p in timed),
                        "overhead": statistics.median(p.overhead for p in timed),
                    }
                ),
                **{
                    f"{name}_speedup": statistics.median(p.extra[name] for p in passes[0])
                    / statistics.median(p.extra[name] for p in timed)
                    for name in timed[0].extra
                },
            }
        )
    return out


def knn_column(key: str, features: np.ndarray, labels: np.ndarray, k: int) -> dict[str, float]:
    """{key: leave-one-out k-NN accuracy}, or nothing, with a warning (the bench's note) saying why
    it would mean nothing on these labels."""
    problem = metrics.knn_problem(labels, k)
    if problem is None:
        return {key: metrics.knn_accuracy(features, labels, k)}
    hint = "give more inputs (bench: --limit, calibrate: --holdout)"
    warnings.warn(f"{key} left out: {problem}; {hint}", stacklevel=2)
    return {}
