"""A calibration run: what it is asked for (`Settings`), the search on each calibration set under a
work or a measured-speedup budget, and the records of the outcome (the configuration file, the
held-out evaluation's results)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ... import __version__
from ...api.progress import progress_bar
from ...core import schedule as sched
from ...core.messages import did_you_mean
from ...methods import available
from .. import measure, meta
from ..at_speed import parse_targets
from ..measure import Config
from ..speed_match import Target
from .search import METHODS, Candidate, Found, Trial, constant, search
from .speed import search_at_speed


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
class Settings:
    """What a calibration run is asked for, recorded with its results. `holdout`, `batch_size` and
    `timing_size` default per task (400 texts at batch 16, 256 texts timed; 500 images at the
    classifier's batch, 1,000 images timed)."""

    keep: float | None = None
    speedup: float | None = None
    speed_of: str | None = None  # 'truncation@0.5': the speedup of that baseline, measured in the run
    calib_size: int = 64
    timing_size: int | None = None  # at a speed budget: inputs after the calibration sets, timed
    methods: Sequence[str] = METHODS
    time_limit: float = 180.0
    repeats: int = 1
    holdout: int | None = None
    batch_size: int | None = None
    eval_repeats: int = 3
    model: str = "minilm"
    max_length: int = 512  # text only
    short_length: int | None = 128  # text only: also scored cut to this length (`tasks.run_text`)
    fit_temperature: bool = False  # classifiers only
    data_path: str | None = None  # classifiers only: the Fashion-MNIST folder
    progress: bool = True

    def budget(self, task: str = "text") -> float:
        """The work fraction to search at first, once what was asked is checked. task: text or
        vision, whose baseline `speed_of` names."""
        if sum(b is not None for b in (self.keep, self.speedup, self.speed_of)) != 1:
            raise ValueError(
                "give the budget as one of --keep (work fraction), --speedup (measured) or --speed-of "
                "(a baseline's measured speed)"
            )
        if self.speedup is not None and self.speedup <= 1:
            raise ValueError(f"speedup must be above 1, got {self.speedup}")
        target = self.target(task)
        unknown = [m for m in self.methods if m not in available()]
        if unknown:
            named = ", ".join(m + did_you_mean(m, available()) for m in unknown)
            raise ValueError(f"unknown method(s) {named}; choose from: {', '.join(available())}")
        if self.calib_size < 2:
            raise ValueError(
                f"calib_size must be at least 2, got {self.calib_size}: a change must beat the choice by "
                "a standard error of the per-input differences, which takes two inputs; give a larger "
                "--calib-size"
            )
        measure.check_positive(
            repeats=self.repeats,
            holdout=self.holdout,
            batch_size=self.batch_size,
            eval_repeats=self.eval_repeats,
            timing_size=self.timing_size,
            max_length=self.max_length,
            short_length=self.short_length,
        )
        if isinstance(target, Config):
            return target.keep
        return sched.check_keep(1 / self.speedup if self.keep is None else self.keep)

    def target(self, task: str = "text") -> Target | None:
        """The speed to reach: a speedup, a baseline configuration, or None for a work budget."""
        if self.speed_of is None:
            return self.speedup
        targets = parse_targets(self.speed_of, task)
        if len(targets) != 1:
            one = f"{targets[0].method}@{targets[0].keep:g}"
            raise ValueError(f"--speed-of {self.speed_of}: give one baseline, e.g. --speed-of {one}")
        return targets[0]

    @property
    def at_speed(self) -> bool:
        """The budget is a measured speed (`speedup`, `speed_of`), not a work fraction."""
        return self.speedup is not None or self.speed_of is not None

    @property
    def timing_inputs(self) -> tuple[int, int] | None:
        """At a speed budget, the timing set's inputs [first, end): after the calibration sets."""
        first = self.holdout + self.calib_size * self.repeats
        return (first, first + self.timing_size) if self.at_speed else None

    def starts(self, total: int, what: str) -> list[int]:
        """Where each calibration set begins: after the held-out inputs, disjoint, and before the
        timing set (`timing_inputs`)."""
        timing = self.timing_inputs
        if (timing[1] if timing else self.holdout + self.calib_size * self.repeats) > total:
            timed = f" plus {self.timing_size} timing" if timing else ""
            raise ValueError(
                f"{self.holdout} held-out plus {self.repeats} x {self.calib_size} calibration{timed} {what} "
                f"exceed the {total} available; lower --calib-size, --repeats, --holdout or --timing-size"
            )
        return [self.holdout + r * self.calib_size for r in range(self.repeats)]

    def record(self, data: str) -> dict[str, Any]:
        """The arguments as the results' meta holds them: what applies to this task only."""
        others = ("max_length", "short_length") if data == "fmnist" else ("fit_temperature",)
        record = dataclasses.asdict(self)
        for key in ("progress", "data_path", *others):
            del record[key]
        return {**record, "data": data, "methods": list(self.methods), "timing_inputs": self.timing_inputs}


def calibrate_sets(
    model,
    objective: Callable[[int], tuple[Callable[[Candidate], np.ndarray], measure.Task]],
    settings: Settings,
    starts: list[int],
    timing: measure.Task | None = None,
    task: str = "text",
) -> list[Found]:
    """Search on each calibration set. objective(first) gives, for the set starting at `first`, its
    score function and the set as a bench task (`measure.Task`), to time a speed target on. At a
    work budget, the staged `search`; at a speed (`speedup`, `speed_of`, whose baseline is the
    `task`'s), `speed.search_at_speed`, timed on the set and last on the `timing` set as the bench
    times."""
    num_layers = model.config.num_hidden_layers
    keep, target = settings.budget(task), settings.target(task)
    found = []
    with progress_bar(settings.progress) as bar:
        for r, first in enumerate(starts):
            task_bar = bar.add_task(f"calibration set {r + 1}/{len(starts)}", total=None)

            def say(what: str, task_bar=task_bar, r=r) -> None:
                bar.update(task_bar, description=f"calibration set {r + 1}/{len(starts)}: {what}")

            score, subject = objective(first)
            if target is None:
                trials = search(score, keep, num_layers, settings.methods, settings.time_limit, say)
                found.append(Found(trials, keep, first))
            else:
                chosen = search_at_speed(
                    score,
                    subject,
                    timing,
                    target,
                    keep,
                    num_layers,
                    tuple(settings.methods),
                    settings.time_limit,
                    lambda c, k: config_of(c, k),
                    say,
                )
                found.append(dataclasses.replace(chosen, first=first))
            bar.remove_task(task_bar)
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
        "constant_at_speed": first.constant,
        "timing_probes": [list(p) for p in first.probes],
        "methods_at_speed": first.methods,
        "trials": len(first.trials),
        "time_limit": arguments["time_limit"],
        "speedup_target": arguments["speedup"],
        "speed_of": arguments["speed_of"],
        "timing_inputs": arguments["timing_inputs"] and list(arguments["timing_inputs"]),
        "speed_over_target": first.ratios,
    }
    config = config_record(best, first.keep, how)
    row = next(r for r in rows if r["name"] == "calibrated")
    config["measured"] = {  # on the held-out inputs, in the evaluation's run
        "speedup": row["speedup"],
        quality: row.get(quality),
        "target_speedup": next((r["speedup"] for r in rows if "@" in r["name"]), arguments["speedup"]),
    }
    calibrated = [r[quality] for r in rows if re.fullmatch(r"calibrated( \d+)?", r["name"])]
    evaluated = meta.results(
        rows,
        notes,
        {"task": "calibrate", **arguments, "keep": first.keep},
        config=config,
        spread={
            "quality": quality,
            "heldout": calibrated,
            "range": max(calibrated) - min(calibrated),
            "configs": [{"method": f.best.method, "shape": f.best.shape, "keep": f.keep} for f in found],
        },
        top_trials=[  # the chosen one first, then the best means
            {
                "method": t.candidate.method,
                "shape": t.candidate.shape,
                "options": t.candidate.options,
                "score": t.score,
            }
            for t in first.trials[:8]
        ],
    )
    return evaluated, config


def config_of(candidate: Candidate, keep: float | None = None, name: str = "", **extra: Any) -> Config:
    """A candidate as a configuration to run, at the keep it was searched at (by default its
    schedule's work: the schedule is what runs); `extra`: more options (a fitted temperature)."""
    keep = sched.work(candidate.schedule) if keep is None else keep
    return Config(candidate.method, keep, {**candidate.apply_options(), **extra}, name)


def calibrated_configs(
    found: list[Found], baselines: Sequence[str], target: Config | float | None = None, **extra: Any
) -> list[Config]:
    """What the evaluation compares: full, the calibrated configuration, the same method with its
    constant schedule at the same budget, the baselines (at the same budget; a baseline `target`
    at its own keep, named as --speed-of names it), and the other sets' calibrations."""
    first = found[0]
    if isinstance(target, Config):
        compared = [dataclasses.replace(target, name=f"{target.method}@{target.keep:g}")]
    else:
        compared = [Config(b, first.keep) for b in baselines]
    configs = [
        measure.FULL,
        config_of(first.best, first.keep, "calibrated", **extra),
        Config(first.best.method, first.keep, name="constant"),
        *compared,
    ]
    return configs + [
        config_of(f.best, f.keep, f"calibrated {r + 2}", **extra) for r, f in enumerate(found[1:])
    ]
