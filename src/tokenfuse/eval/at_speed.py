"""`tokenfuse bench --at-speed truncation@0.5`: methods compared at equal measured speed rather than
equal work. A user decides by speed ("as fast as cutting the text in half, but better"); at equal
work a method with overhead is slower than truncation, and the table would not say by how much
quality it pays for that.

For every target (a baseline at a keep), each method's keep is searched (`speed_match`) until its
measured speed matches the baseline's in the same run; then one comparison (`measure.compare`)
times the full model, the baselines and every method at its found keep together, so that every
row's speed and quality come from one run. A row carries the target it was matched to and the
target's speedup in that comparison beside its own; the search's probes are in the results' meta.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from ..core.messages import did_you_mean
from ..methods import available
from . import measure
from .measure import FULL, Config
from .speed_match import KeepSearch, Probe, lowest_keep, match

TARGETS = {"text": "truncation", "vision": "resize"}  # the baseline a task's speed targets are taken from


def parse_targets(spec: str, task: str) -> list[Config]:
    """'truncation@0.7,truncation@0.5' as the baseline configurations they name; refused, naming the
    fix, where a baseline is not the task's or a keep is not in (0, 1)."""
    own = TARGETS[task]
    example = f"e.g. --at-speed {own}@0.7,{own}@0.5"
    targets = []
    for item in (i.strip() for i in spec.split(",")):
        name, sep, value = item.partition("@")
        if not sep or not name:
            raise ValueError(f"--at-speed {item!r}: expected BASELINE@KEEP, {example}")
        if name != own:
            other = next((t for t, b in TARGETS.items() if b == name), None)
            if other is not None:
                raise ValueError(
                    f"--at-speed {item}: {name} is a baseline of the {other} bench; the {task} bench's "
                    f"speed targets are {own}@KEEP ({example})"
                )
            raise ValueError(
                f"--at-speed {item}: unknown baseline {name!r}{did_you_mean(name, [own])}; {example}"
            )
        try:
            keep = float(value)
        except ValueError:
            raise ValueError(f"--at-speed {item}: keep {value!r} is not a number; {example}") from None
        if not 0.0 < keep < 1.0:
            raise ValueError(
                f"--at-speed {item}: keep must be in (0, 1), got {keep:g} (at 1 the baseline is the full "
                f"model); {example}"
            )
        targets.append(Config(own, keep))
    return targets


def runs(method: str, keep: float, options: dict[str, Any], num_layers: int) -> bool:
    """Whether `method` with `options` has a schedule at `keep` on `num_layers` layers."""
    try:
        available()[method](keep=keep, **options).schedule_for(num_layers)
    except ValueError:
        return False
    return True


def compare(
    task: measure.Task,
    targets: Sequence[Config],
    methods: Sequence[str],
    options: dict[str, Any],
    repeats: int,
    bar,
    extra: Sequence[Config] = (),
) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """Rows (full; per target its baseline, then each method at the keep found for it; then
    `extra`, unmatched), notes, and each search's probes. bar: a rich progress bar."""
    num_layers = task.model.config.num_hidden_layers
    probes: dict[tuple[int, str], Probe] = {}
    for t, target in enumerate(targets):
        for method in methods:
            lowest = lowest_keep(lambda k, m=method: runs(m, k, options, num_layers))
            probes[t, method] = Probe(_maker(method, options), KeepSearch(target.keep, lowest), t)
    progress = bar.add_task(f"{task.name}: speed search", total=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        match(task, list(targets), probes, repeats, lambda what: bar.update(progress, description=what))
    bar.remove_task(progress)
    found = {key: p.search.result() for key, p in probes.items()}
    configs, of = [FULL], [None]
    for t, target in enumerate(targets):
        configs.append(target)
        of.append(t)
        for method in methods:
            configs.append(_maker(method, options)(found[t, method][0]))
            of.append(t)
    configs += extra
    of += [None] * len(extra)
    rows, notes = measure.compare(task, configs, repeats, bar)
    speeds = {t: rows[configs.index(target)]["speedup"] for t, target in enumerate(targets)}
    for row, t in zip(rows, of, strict=True):
        row["target"] = None if t is None else f"{targets[t].method}@{targets[t].keep:g}"
        row["target_speedup"] = None if t is None else speeds[t]
    searches, short = [], []
    for (t, method), p in probes.items():
        keep, ratio = found[t, method]
        searches.append(
            {
                "target": rows[configs.index(targets[t])]["target"],
                "method": method,
                "keep": keep,
                "ratio": ratio,
                "probes": [list(x) for x in p.search.measured],
            }
        )
        if ratio < p.search.band[0]:
            short.append(
                f"{method} could not reach the speed of {searches[-1]['target']}: at its fastest probe "
                f"(keep {keep:.3g}; the least it runs at is {p.search.lowest:.3g}) it ran at {ratio:.2f} "
                "of its speed"
            )
    return rows, sorted({*notes, *(str(w.message) for w in caught), *short}), searches


def _maker(method: str, options: dict[str, Any]):
    def make(keep: float) -> Config:
        return Config(method, keep, options)

    return make
