"""Calibration at a measured speed (`--speedup S`, `--speed-of truncation@0.5`): method x schedule
shape x budget, timed on this machine and model, for the best calibration quality among the
configurations at least as fast as the target.

Speed falls as keep rises for a fixed method and shape, so a few timed probes (`speed_match`) find
each keep; quality is searched at that keep by the staged `search`. In turn:
  1. each method's keep at the target speed with its constant schedule;
  2. each method's search (shapes, options, moved points) at its keep, on an equal share of the time;
  3. each method's choice timed against the target; one outside the band has its keep searched
     again on its own shape (its moved points dropped, as a shape does not carry them to another
     keep) and is scored there;
  4. the first method's choice, replaced by a later one's only where it `beats` it, among those at
     least as fast as the target (the fastest where none is).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..measure import Task
from ..speed_match import KeepSearch, Probe, Target, lowest_keep, match
from .search import Candidate, Trial, Z, constant, search, shaped

#: speed / target speed on the calibration set: at least 3% faster, by at most 8%. A margin, so that the
#: configuration is at least as fast as the target on other inputs in another run: the speed ratio
#: on a few dozen calibration documents and on the held-out ones differ by a few percent (README)
BAND = (1.03, 1.08)
ROUNDS = 3  # interleaved timing rounds of each probe


def reshaped(candidate: Candidate, keep: float, num_layers: int) -> Candidate | None:
    """The candidate's method, options and shape at another keep (None where it cannot reach it)."""
    c = candidate
    if c.gamma is None:
        return constant(c.method, keep, num_layers, c.options)
    return shaped(c.method, keep, num_layers, c.gamma, c.options)


def search_at_speed(
    score: Callable[[Candidate], np.ndarray],
    subject: Task,
    target: Target,
    keep: float,
    num_layers: int,
    methods: tuple[str, ...],
    time_limit: float,
    configure: Callable[[Candidate, float], object],
    say: Callable[[str], None] = lambda _: None,
) -> tuple[list[Trial], float, float]:
    """(trials, the chosen first; its keep; its speed over the target's). `keep`: where the speed
    search starts; configure(candidate, keep): the configuration that runs it."""
    usable = [m for m in methods if lowest_keep(lambda k, m=m: constant(m, k, num_layers) is not None) < 1]

    def probe(candidate: Candidate, start: float, found: bool) -> Probe:
        """The candidate's keep search; `found`: the candidate itself runs at `start`."""

        def make(k: float):
            return configure(candidate if found and k == start else reshaped(candidate, k, num_layers), k)

        lowest = lowest_keep(lambda k: reshaped(candidate, k, num_layers) is not None)
        return Probe(make, KeepSearch(start, lowest, BAND))

    first = {m: probe(constant(m, 1.0, num_layers), keep, False) for m in usable}  # 1: each method's keep
    match(subject, [target], first, ROUNDS, say)
    keeps = {m: p.search.result()[0] for m, p in first.items()}
    searched = {  # 2: quality at that keep
        m: search(score, keeps[m], num_layers, (m,), time_limit / len(usable), say) for m in usable
    }
    checks = {m: probe(searched[m][0].candidate, keeps[m], True) for m in usable}  # 3: timed, corrected
    match(subject, [target], checks, ROUNDS, say)
    pool = []
    for m in usable:
        best, (k, ratio) = searched[m][0], checks[m].search.result()
        if k != keeps[m]:
            moved = reshaped(best.candidate, k, num_layers)
            best = Trial(moved, np.asarray(score(moved), dtype=np.float64))
        pool.append((best, k, ratio))
    fast = [p for p in pool if p[2] >= BAND[0]] or [max(pool, key=lambda p: p[2])]
    chosen = fast[0]  # 4: later methods replace it on evidence only
    for p in fast[1:]:
        if p[0].beats(chosen[0], Z):
            chosen = p
    best, k, ratio = chosen
    others = [t for trials in searched.values() for t in trials if t is not best]
    return [best, *sorted(others, key=lambda t: -t.score)], k, ratio
