"""`tokenfuse calibrate`: the reduction configuration that loses the least at a given budget, found
without training on a few dozen inputs.

A constant per-layer rate is the papers' default, not the best use of a budget. The search scores a
candidate (method, options, per-layer schedule) by how close the reduced model stays to the full one
on the calibration inputs (embedding cosine for encoders), reusing the full model's outputs, and
stops at a time limit. Schedules come from one family (`schedule.power`): from front-loaded (most
tokens go early, where attention is widest) to back-loaded, always at the same work. Stages:
  1. every candidate method with its constant schedule and with each shape of the family;
  2. the best method's options (proportional attention off; ToMe's similarity on keys);
  3. a finer shape search between the best shape's neighbours;
  4. while time remains, single points moved up or down, the others making up the budget.
A later method, and every change of stages 2-4, replaces the choice only for a gain larger than
its standard error over the calibration inputs: without that guard, the search fitted the noise of
a small set (a method or a moved point winning by a fraction of its standard error) and lost on
held-out inputs (README, calibration).
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..api import apply, embed, remove
from ..api.progress import progress_bar
from ..assets import text as data
from ..core import schedule as sched
from ..methods import Method, available
from .bench_text import Config, environment, measure

METHODS = (
    "tome",
    "mctf",
    "transforming",
    "pitome",
)  # the bench's leading merging methods, ToMe (cheapest) first
SHAPES = (0.05, 0.15, 0.3, 0.5, 1.0, 2.0)  # gamma of schedule.power: front- to back-loaded
OPTIONS = {"tome": ({"similarity": "keys"},)}  # method-specific variants tried in stage 2
Z = 1.0  # standard errors by which a change must beat the choice (Trial.beats)


@dataclass(frozen=True)
class Candidate:
    method: str
    schedule: tuple[float, ...]
    options: dict[str, Any] = field(default_factory=dict)
    gamma: float | None = None  # the power family's shape; None for the method's constant schedule
    nudged: int = 0  # points moved by the refinement stage

    @property
    def shape(self) -> str:
        shape = "constant" if self.gamma is None else f"power {self.gamma:.3g}"
        return shape + (f", {self.nudged} points refined" if self.nudged else "")

    def apply_options(self) -> dict[str, Any]:
        return {**self.options, "schedule": list(self.schedule)}


@dataclass
class Trial:
    candidate: Candidate
    scores: np.ndarray  # one per calibration input, higher for closer to the full model

    @property
    def score(self) -> float:
        return float(self.scores.mean())

    def beats(self, other: Trial, z: float) -> bool:
        """Better than `other` by more than z standard errors of the paired per-input differences:
        a move the calibration set supports, not one that fits its noise."""
        d = self.scores - other.scores
        return len(d) > 1 and d.mean() > z * d.std(ddof=1) / math.sqrt(len(d))


def constant(method: str, keep: float, num_layers: int, options=None) -> Candidate:
    """The method's own default schedule at this budget, the baseline to beat."""
    instance = available()[method](keep=keep, **(options or {}))
    return Candidate(method, tuple(instance.schedule_for(num_layers)), dict(options or {}))


def shaped(method: str, keep: float, num_layers: int, gamma: float, options=None) -> Candidate | None:
    """A schedule of the power family, or None where that shape cannot reach the budget."""
    needs = available()[method](**(options or {})).needs
    first = 1 if needs & Method.ATTENTION_INPUTS else 0  # attention scores exist only after a layer
    try:
        schedule = sched.power(keep, num_layers, gamma, first)
    except ValueError:
        return None
    return Candidate(method, tuple(schedule), dict(options or {}), gamma)


def search(
    score: Callable[[Candidate], np.ndarray],
    keep: float,
    num_layers: int,
    methods: Sequence[str] = METHODS,
    time_limit: float = 180.0,
    progress: Callable[[str], None] = lambda _: None,
    z: float = Z,
) -> list[Trial]:
    """Every trial made: the chosen one first, then the others best first. `score` gives one value
    per calibration input, higher for closer to the full model. Each method's best shape replaces
    the choice so far (the first method's) only if it `beats` it, and so does each later stage's
    trial, so that on a few inputs the choice stops where the evidence does."""
    deadline = time.monotonic() + time_limit
    trials: list[Trial] = []

    def trial(candidate: Candidate | None) -> Trial | None:
        late = trials and time.monotonic() > deadline  # the first trial always runs
        if candidate is None or late or any(t.candidate == candidate for t in trials):
            return None
        progress(f"{candidate.method}, {candidate.shape} {candidate.options or ''}")
        trials.append(Trial(candidate, np.asarray(score(candidate), dtype=np.float64)))
        return trials[-1]

    def consider(candidate: Candidate | None) -> None:
        nonlocal chosen
        new = trial(candidate)
        if new is not None and new.beats(chosen, z):
            chosen = new

    chosen: Trial | None = None
    for method in methods:  # stage 1
        trial(constant(method, keep, num_layers))
        for gamma in SHAPES:
            trial(shaped(method, keep, num_layers, gamma))
        own = max((t for t in trials if t.candidate.method == method), key=lambda t: t.score, default=None)
        if chosen is None or (own is not None and own.beats(chosen, z)):
            chosen = own
    top = chosen.candidate  # stage 2: the same shape with other options (which may move its first point)
    for options in ({"prop_attn": False}, *OPTIONS.get(top.method, ())):
        options = {**top.options, **options}
        if top.gamma is None:
            consider(constant(top.method, keep, num_layers, options))
        else:
            consider(shaped(top.method, keep, num_layers, top.gamma, options))
    step = 2.0  # stage 3: halve the step of the shape, in log gamma, around the choice
    while chosen.candidate.gamma is not None and step > 1.1 and time.monotonic() < deadline:
        step, top = math.sqrt(step), chosen.candidate
        for gamma in (top.gamma / step, top.gamma * step):
            consider(shaped(top.method, keep, num_layers, gamma, top.options))
    factor = 1.2  # stage 4: move single points, the others making up the budget, while time remains
    while factor > 1.02 and time.monotonic() < deadline:
        start = chosen
        for point in range(len(start.candidate.schedule)):
            for f in (factor, 1 / factor):
                top = chosen.candidate
                moved = sched.nudge(top.schedule, point, f)
                if moved is not None:
                    consider(dataclasses.replace(top, schedule=tuple(moved), nudged=top.nudged + 1))
        if chosen is start:
            factor = math.sqrt(factor)
    return [chosen, *sorted((t for t in trials if t is not chosen), key=lambda t: -t.score)]


def config_record(best: Trial, keep: float, how: dict[str, Any]) -> dict[str, Any]:
    """The JSON a calibration writes, and `tokenfuse.apply(model, config=path)` reads."""
    c = best.candidate
    return {
        "tokenfuse": __version__,
        "method": c.method,
        "options": c.options,
        "schedule": list(c.schedule),
        "keep": keep,
        "work": sched.work(c.schedule),
        "found": {"shape": c.shape, "calibration_score": best.score, **how},
    }


@dataclass
class Found:
    """The outcome of calibrating on one set: trials as `search` orders them (the chosen first),
    the keep searched at (corrected for a speedup budget), the speedups measured on the way, and
    where the set starts."""

    trials: list[Trial]
    keep: float
    measured: list[float]
    first: int

    @property
    def best(self) -> Candidate:
        return self.trials[0].candidate


@dataclass
class Settings:
    """What a calibration run is asked for, recorded with its results. `holdout` and `batch_size`
    default per task (400 texts at batch 16; 500 images at the classifier's batch)."""

    keep: float | None = None
    speedup: float | None = None
    calib_size: int = 64
    methods: Sequence[str] = METHODS
    time_limit: float = 180.0
    repeats: int = 1
    holdout: int | None = None
    batch_size: int | None = None
    eval_repeats: int = 3
    model: str = "minilm"
    max_length: int = 512  # text only
    fit_temperature: bool = False  # classifiers only
    data_path: str | None = None  # classifiers only: the Fashion-MNIST folder
    progress: bool = True

    def budget(self) -> float:
        """The work fraction to search at first, once what was asked is checked."""
        if (self.keep is None) == (self.speedup is None):
            raise ValueError(
                "give the budget as either --keep (work fraction) or --speedup (measured), not both"
            )
        if self.speedup is not None and self.speedup <= 1:
            raise ValueError(f"speedup must be above 1, got {self.speedup}")
        unknown = [m for m in self.methods if m not in available()]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(available())}")
        if self.calib_size < 1 or self.repeats < 1:
            raise ValueError("calib-size and repeats must be at least 1")
        return sched.check_keep(1 / self.speedup if self.keep is None else self.keep)

    def starts(self, total: int, what: str) -> list[int]:
        """Where each calibration set begins: after the held-out inputs, disjoint."""
        if self.holdout + self.calib_size * self.repeats > total:
            raise ValueError(
                f"{self.holdout} held-out plus {self.repeats} x {self.calib_size} calibration {what} exceed "
                f"the {total} available; lower --calib-size, --repeats or --holdout"
            )
        return [self.holdout + r * self.calib_size for r in range(self.repeats)]

    def record(self, data: str) -> dict[str, Any]:
        """The arguments as the results' meta holds them: what applies to this task only."""
        other = "max_length" if data == "fmnist" else "fit_temperature"
        record = dataclasses.asdict(self)
        for key in ("progress", "data_path", other):
            del record[key]
        return {**record, "data": data, "methods": list(self.methods)}


def calibrate_sets(
    model,
    objective: Callable[[int], tuple[Callable[[Candidate], np.ndarray], Callable[[], Any]]],
    settings: Settings,
    starts: list[int],
) -> list[Found]:
    """Search on each calibration set. objective(first) gives, for the set starting at `first`, its
    score function and a function running the full-size model on it (for timing a speedup budget).

    With `speedup`, the budget is measured: a first search at keep = 1 / speedup, the found
    configuration timed against the full model on the set, keep corrected by the shortfall, and a
    second search; each gets half the time.
    """
    num_layers = model.config.num_hidden_layers
    keep, speedup, rounds = settings.budget(), settings.speedup, 1 if settings.speedup is None else 2
    found = []
    with progress_bar(settings.progress) as bar:
        for r, first in enumerate(starts):
            task = bar.add_task(f"calibration set {r + 1}/{len(starts)}", total=None)

            def say(what: str, task=task, r=r) -> None:
                bar.update(task, description=f"calibration set {r + 1}/{len(starts)}: {what}")

            score, run = objective(first)
            k, measured = keep, []
            for _ in range(rounds):
                if measured:
                    k = sched.check_keep(min(1.0, k * measured[-1] / speedup))
                trials = search(score, k, num_layers, settings.methods, settings.time_limit / rounds, say)
                if speedup is not None:
                    measured.append(timed_speedup(model, trials[0].candidate, run))
            remove(model)
            found.append(Found(trials, k, measured, first))
            bar.remove_task(task)
    return found


def results(
    found: list[Found],
    rows: list[dict[str, Any]],
    notes: list[str],
    arguments: dict[str, Any],
    objective: str,
    seconds: float,
    quality: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The evaluation results and the configuration of the first set, with the spread of held-out
    `quality` over the calibrated configurations of every set."""
    first = found[0]
    best = first.trials[0]
    num_layers = len(best.candidate.schedule) - 1
    baseline = constant(best.candidate.method, first.keep, num_layers)
    how = {
        "model": arguments["model"],
        "data": arguments["data"],
        "objective": objective,
        "seconds": seconds,
        "calib_size": arguments["calib_size"],
        "calibration_inputs": [first.first, first.first + arguments["calib_size"]],
        "constant_score": next((t.score for t in first.trials if t.candidate == baseline), None),
        "trials": len(first.trials),
        "time_limit": arguments["time_limit"],
        "speedup_target": arguments["speedup"],
        "speedup_measured_on_calibration": first.measured,
    }
    config = config_record(best, first.keep, how)
    calibrated = [r[quality] for r in rows if re.fullmatch(r"calibrated( \d+)?", r["name"])]
    meta = {
        **environment(),
        "arguments": {"task": "calibrate", **arguments, "keep": first.keep},
        "config": config,
        "spread": {
            "quality": quality,
            "heldout": calibrated,
            "range": max(calibrated) - min(calibrated),
            "configs": [{"method": f.best.method, "shape": f.best.shape, "keep": f.keep} for f in found],
        },
        "top_trials": [  # the chosen one first, then the best means
            {
                "method": t.candidate.method,
                "shape": t.candidate.shape,
                "options": t.candidate.options,
                "score": t.score,
            }
            for t in first.trials[:8]
        ],
    }
    return {"meta": meta, "rows": rows, "notes": notes}, config


def calibrated_configs(found: list[Found], baselines: Sequence[str], **extra: Any) -> list[Config]:
    """What the evaluation compares: full, the calibrated configuration, the same method with its
    constant schedule at the same budget, the baselines, and the other sets' calibrations."""
    first = found[0]
    method = first.best.method
    configs = [
        Config("full", 1.0),
        Config(method, first.keep, {**first.best.apply_options(), **extra}, name="calibrated"),
        Config(method, first.keep, name="constant"),
        *(Config(b, first.keep) for b in baselines),
    ]
    return configs + [
        Config(f.best.method, f.keep, {**f.best.apply_options(), **extra}, name=f"calibrated {r + 2}")
        for r, f in enumerate(found[1:])
    ]


def run_text(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibrate an encoder on BBC News (objective: mean embedding cosine to the full model) and
    evaluate on held-out documents: (results, config). The held-out set is the bench's, the first
    `holdout` documents of the fixed shuffled order; the calibration sets follow it, disjoint."""
    s = dataclasses.replace(settings, holdout=settings.holdout or 400, batch_size=settings.batch_size or 16)
    s.budget()  # fail on a bad budget before loading anything
    docs = data.bbc_news()
    starts = s.starts(len(docs.texts), "documents")
    model, tokenizer = data.load_text_model(s.model)

    def objective(first: int):
        texts = docs.texts[first : first + s.calib_size]

        def run():
            return embed(model, tokenizer, texts, s.batch_size, s.max_length, progress=False)

        remove(model)
        full = run()

        def score(candidate: Candidate) -> np.ndarray:
            apply(model, candidate.method, **candidate.apply_options())
            return torch.nn.functional.cosine_similarity(run(), full).numpy()

        return score, run

    start = time.monotonic()
    found = calibrate_sets(model, objective, s, starts)
    seconds = time.monotonic() - start
    held = data.Labelled(docs.texts[: s.holdout], docs.labels[: s.holdout], docs.classes)
    configs = calibrated_configs(found, ("truncation",))
    rows, notes = measure(
        model, tokenizer, configs, held, None, s.batch_size, s.max_length, s.eval_repeats, s.progress
    )
    closeness = "mean embedding cosine to the full model"
    return results(found, rows, notes, s.record("bbc"), closeness, seconds, "cosine")


def timed_speedup(model, candidate: Candidate, run: Callable[[], Any], rounds: int = 3) -> float:
    """Full time over the candidate's time on the same inputs, medians of interleaved rounds."""
    full, reduced = [], []
    for _ in range(rounds):
        remove(model)
        start = time.perf_counter()
        run()
        full.append(time.perf_counter() - start)
        apply(model, candidate.method, **candidate.apply_options())
        start = time.perf_counter()
        run()
        reduced.append(time.perf_counter() - start)
    remove(model)
    return statistics.median(full) / statistics.median(reduced)


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on labelled inputs (Guo et al.,
    ICML 2017); log-probabilities stand in for logits, which they equal up to a per-row constant."""

    def nll(log_t: float) -> float:
        z = log_probs / math.exp(log_t)
        z = z - z.max(1, keepdims=True)
        return float((np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels]).mean())

    lo, hi = math.log(0.05), math.log(20.0)  # golden-section search: NLL is unimodal in log T
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if nll(a) < nll(b) else (a, hi)
    return math.exp((lo + hi) / 2)


def run_classifier(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibrate the Fashion-MNIST classifier (objective: mean KL divergence of the reduced model's
    class distribution from the full one's) and evaluate on held-out test images. The held-out set
    is the vision bench's, the first `holdout` test images; the calibration sets follow it. With
    `fit_temperature`, a temperature is fitted on the calibration set's labels and stored in the config."""
    from . import bench_vision

    s = dataclasses.replace(settings, model="fmnist-vit", holdout=settings.holdout or 500)
    s.budget()  # fail on a bad budget before loading anything
    subject = bench_vision.classifier(s.holdout + s.calib_size * s.repeats, s.data_path, s.batch_size)
    starts = s.starts(len(subject.labels), "images")
    s.batch_size, model = subject.batch_size, subject.model

    def log_probs(pixels) -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate(
                [
                    np.log(subject.forward(model, pixels[i : i + subject.batch_size], False)["probs"] + 1e-12)
                    for i in range(0, len(pixels), subject.batch_size)
                ]
            )

    def objective(first: int):
        pixels = subject.pixels[first : first + s.calib_size]
        remove(model)
        full = log_probs(pixels)

        def score(candidate: Candidate) -> np.ndarray:
            apply(model, candidate.method, **candidate.apply_options())
            reduced = log_probs(pixels)
            return -(np.exp(full) * (full - reduced)).sum(1)

        return score, lambda: log_probs(pixels)

    start = time.monotonic()
    found = calibrate_sets(model, objective, s, starts)
    extra = {}
    if s.fit_temperature:
        first = found[0]
        apply(model, first.best.method, **first.best.apply_options())
        calibration = slice(first.first, first.first + s.calib_size)
        extra["temperature"] = fit_temperature(
            log_probs(subject.pixels[calibration]), subject.labels[calibration]
        )
        remove(model)
    seconds = time.monotonic() - start
    configs = calibrated_configs(found, ("resize",))
    if extra:
        first = found[0]
        options = {**first.best.apply_options(), **extra}
        configs.insert(2, Config(first.best.method, first.keep, options, name="calibrated + temperature"))
    held = dataclasses.replace(
        subject, pixels=subject.pixels[: s.holdout], labels=subject.labels[: s.holdout]
    )
    held.timing = s.holdout
    with progress_bar(s.progress) as bar:
        rows = bench_vision.bench_subject(held, configs, s.eval_repeats, bar)
    for row, config in zip(rows, configs, strict=True):
        row["name"] = config.title
    closeness = "mean KL(full || reduced) of class distributions"
    result, config = results(found, rows, [], s.record("fmnist"), closeness, seconds, "accuracy")
    config.update(extra)
    return result, config
