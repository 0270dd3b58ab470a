"""The search: candidates (method, options, per-layer schedule at one work), trials (a candidate's
per-input scores), and the staged search that picks one without fitting the calibration set's noise."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...core import schedule as sched
from ...methods import Method, available

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


@dataclass
class Found:
    """The outcome of calibrating on one set: trials (the chosen first), the chosen keep, and where
    the set starts. At a speed budget (`speed.search_at_speed`), also: the choice's speed over the
    target's on the calibration set and on the timing set (`ratios`); its method's constant schedule
    at the same speed ({"keep", "calibration_score"}) where the choice is a shape; stage 5's probes
    (keep, ratio) on the timing set; each method's choice at the end of stage 3 (shape, keep, speed
    over the target's, calibration score), which stage 4 chose among."""

    trials: list[Trial]
    keep: float
    first: int = 0
    ratios: dict[str, float] = field(default_factory=dict)
    constant: dict[str, float] | None = None
    probes: list[tuple[float, float]] = field(default_factory=list)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def best(self) -> Candidate:
        return self.trials[0].candidate


def constant(method: str, keep: float, num_layers: int, options=None) -> Candidate | None:
    """The method's own default schedule at this budget, the baseline to beat; None where it cannot
    reach the budget (a method scoring by attention cannot reduce before the first layer)."""
    instance = available()[method](keep=keep, **(options or {}))
    try:
        schedule = instance.schedule_for(num_layers)
    except ValueError:
        return None
    return Candidate(method, tuple(schedule), dict(options or {}))


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
    its constant schedule only if it `beats` it, each method's choice replaces the choice so far (the
    first method's) only if it `beats` that, and so does each later stage's trial, so that on a few
    inputs the choice stops where the evidence does."""
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
        base = trial(constant(method, keep, num_layers))
        for gamma in SHAPES:
            trial(shaped(method, keep, num_layers, gamma))
        own = max((t for t in trials if t.candidate.method == method), key=lambda t: t.score, default=None)
        if base is not None and not own.beats(base, z):  # a shape, too, must beat the papers' default
            own = base
        if chosen is None or (own is not None and own.beats(chosen, z)):
            chosen = own
    if chosen is None:
        raise ValueError(
            f"keep {keep:.3g} is below what {', '.join(methods)} can reach on {num_layers} layers; "
            "give a larger budget"
        )
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
