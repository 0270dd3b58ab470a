"""Calibration at a measured speed (`--speedup S`, `--speed-of truncation@0.5`): method x schedule
shape x budget, timed on this machine and model, for the best calibration quality among the
configurations at least as fast as the target.

Speed falls as keep rises for a fixed method and shape, so a few timed probes (`speed_match`) find
each keep; quality is searched at that keep by the staged `search`. In turn:
  1. each method's keep at the target speed with its constant schedule, at the band's centre
     (`centred`: a band's width of speed can be worth more calibration score than separates the
     methods, README);
  2. each method's search (shapes, options, moved points) at its keep, on an equal share of the time;
  3. each method's choice timed against the target; one outside the band has its keep searched
     again on its own shape (its moved points dropped, as a shape does not carry them to another
     keep) and is scored there;
  4. the first method's choice, replaced by a later one's only where it `beats` it, among those at
     least as fast as the target (the fastest where none is): stage 5 sets the margin;
  5. the choice's keep, and its method's constant schedule's, searched again on the timing set
     (more inputs than the calibration set, none of them held out): a few dozen inputs time the
     speed of a few hundred to within ten percent or so (README), which a margin would have to
     cover with keep. The shape stays only if it reaches the speed and beats the constant there, as in stage 1
     at equal work (the constant where only it reaches the speed; the faster where neither does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from ..measure import Task
from ..speed_match import KeepSearch, Probe, Target, lowest_keep, match
from .search import Candidate, Found, Trial, Z, constant, search, shaped

#: speed / target speed on the calibration set (stages 1-3): at least 3% faster, by at most 8%, a
#: margin for the few inputs it is timed on
BAND = (1.03, 1.08)
#: speed / target speed on the timing set (stage 5): at least 1% faster, by at most 5%, a margin for
#: the run that evaluates it, whose timings differ from the search's by a percent or two (README)
FINAL_BAND = (1.01, 1.05)
ROUNDS = 3  # interleaved timing rounds of each probe
PROBES = 6  # probes of a keep search on the calibration set (a few seconds each)
FINAL_PROBES = 4  # and on the timing set (a minute or so each)


def reshaped(candidate: Candidate, keep: float, num_layers: int) -> Candidate | None:
    """The candidate's method, options and shape at another keep (None where it cannot reach it)."""
    c = candidate
    if c.gamma is None:
        return constant(c.method, keep, num_layers, c.options)
    return shaped(c.method, keep, num_layers, c.gamma, c.options)


def centred(search: KeepSearch) -> float:
    """The search's keep, moved to where its probes put the band's centre (`KeepSearch.aim`) where it ended
    within the band: every method then starts at one speed, not wherever in the band its probes
    landed."""
    keep, ratio = search.result()
    return search.level(search.aim) if search.band[0] <= ratio <= search.band[1] else keep


def search_at_speed(
    score: Callable[[Candidate], np.ndarray],
    subject: Task,
    timed: Task,
    target: Target,
    keep: float,
    num_layers: int,
    methods: tuple[str, ...],
    time_limit: float,
    configure: Callable[[Candidate, float], object],
    say: Callable[[str], None] = lambda _: None,
) -> Found:
    """`subject`: the calibration set as a task to time; `timed`: the timing set; `keep`: where the
    speed search starts; configure(candidate, keep): the configuration that runs it."""
    usable = [m for m in methods if lowest_keep(lambda k, m=m: constant(m, k, num_layers) is not None) < 1]

    def probe(candidate: Candidate, start: float, found: bool, band=BAND, probes=PROBES) -> Probe:
        """The candidate's keep search; `found`: the candidate itself runs at `start`."""

        def make(k: float):
            return configure(candidate if found and k == start else reshaped(candidate, k, num_layers), k)

        lowest = lowest_keep(lambda k: reshaped(candidate, k, num_layers) is not None)
        return Probe(make, KeepSearch(start, lowest, band, probes))

    def scored(candidate: Candidate, keep: float) -> Trial:
        moved = reshaped(candidate, keep, num_layers)
        return Trial(moved, np.asarray(score(moved), dtype=np.float64))

    def at(trial: Trial, old: float, new: float) -> Trial:
        """The trial at the keep its search ended at, scored there where that moved it."""
        return trial if new == old else scored(trial.candidate, new)

    first = {m: probe(constant(m, 1.0, num_layers), keep, False) for m in usable}  # 1: each method's keep
    match(subject, [target], first, ROUNDS, say)
    keeps = {m: centred(p.search) for m, p in first.items()}
    searched = {  # 2: quality at that keep
        m: search(score, keeps[m], num_layers, (m,), time_limit / len(usable), say) for m in usable
    }
    checks = {m: probe(searched[m][0].candidate, keeps[m], True) for m in usable}  # 3: timed, corrected
    match(subject, [target], checks, ROUNDS, say)
    pool = []
    for m in usable:
        k, ratio = checks[m].search.result()
        pool.append((at(searched[m][0], keeps[m], k), k, ratio))
    fast = [p for p in pool if p[2] >= 1.0] or [max(pool, key=lambda p: p[2])]
    chosen = fast[0]  # 4: later methods replace it on evidence only
    for p in fast[1:]:
        if p[0].beats(chosen[0], Z):
            chosen = p
    best, k, ratio = chosen
    default = dataclasses.replace(best.candidate, gamma=None, nudged=0)  # 5: on the timing set
    finals = {"chosen": probe(best.candidate, k, True, FINAL_BAND, FINAL_PROBES)}
    if best.candidate != reshaped(default, k, num_layers):
        finals["constant"] = probe(default, k, False, FINAL_BAND, FINAL_PROBES)
    match(timed, [target], finals, ROUNDS, say)
    ends = {name: p.search.result() for name, p in finals.items()}
    final = {"chosen": at(best, k, ends["chosen"][0])}
    if "constant" in finals:
        final["constant"] = scored(default, ends["constant"][0])
    fast = [n for n in final if ends[n][1] >= FINAL_BAND[0]] or [max(final, key=lambda n: ends[n][1])]
    # the shape ("chosen", first) against the constant where both reach the speed
    pick = fast[-1] if len(fast) > 1 and not final["chosen"].beats(final["constant"], Z) else fast[0]
    made = [t for trials in searched.values() for t in trials] + [best, *final.values()]
    others = list({id(t): t for t in made if t is not final[pick]}.values())
    return Found(
        [final[pick], *sorted(others, key=lambda t: -t.score)],
        ends[pick][0],
        ratios={"calibration set": ratio, "timing set": ends[pick][1]},
        constant={"keep": ends["constant"][0], "calibration_score": final["constant"].score}
        if pick == "chosen" and "constant" in final
        else None,
        probes=finals[pick].search.measured,
        methods={
            t.candidate.method: {
                "shape": t.candidate.shape,
                "keep": k,
                "speed_over_target": r,
                "calibration_score": t.score,
            }
            for t, k, r in pool
        },
    )
