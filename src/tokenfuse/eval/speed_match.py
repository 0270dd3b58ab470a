"""The budget at which a configuration runs at a target's measured speed: a short search on keep,
shared by `bench --at-speed` and `calibrate --speedup / --speed-of`.

For one method and one schedule shape, speed falls as keep rises (less work is removed), so a few
timed probes find the keep: the first at a given start (the baseline's keep), then a step that
assumes speed proportional to 1 / keep until the target is bracketed, then interpolation in
log keep against log speed, using the probes' own slope. Each probe is timed by `measure.timings`
(interleaved rounds, medians), all pending probes of a step in one timing together with their
targets, so that a change of the machine's load moves target and probe alike.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from . import measure
from .measure import FULL, Config, timings

#: a probe whose speed is within these ratios of the target's matches it: at least as fast, so that a
#: method is never compared with a baseline it is slower than by the search's choice
BAND = (1.0, 1.06)
PROBES = 4  # timed probes per search at most


@dataclass
class KeepSearch:
    """The keep at which speed / target speed (the ratio) comes within `band`, the ratio falling as
    keep rises. `next()` gives the keep to time next (None: stop), aiming at the band's geometric
    centre, `record` takes its ratio. Stops at a probe within the band, after `probes` probes, or
    when the next keep is one already timed (a bound reached). `lowest`: the least keep the method
    and shape can run."""

    start: float
    lowest: float = 0.0
    band: tuple[float, float] = BAND
    probes: int = PROBES
    measured: list[tuple[float, float]] = field(default_factory=list)  # (keep, ratio) in probe order

    def record(self, keep: float, ratio: float) -> None:
        self.measured.append((keep, ratio))

    def next(self) -> float | None:
        if not self.measured:
            return self._clamp(self.start)
        keep, ratio = self.measured[-1]
        if self.band[0] <= ratio <= self.band[1] or len(self.measured) >= self.probes:
            return None
        aim = self.aim
        fast = [p for p in self.measured if p[1] > aim]
        slow = [p for p in self.measured if p[1] < aim]
        if fast and slow:  # bracketed: between the largest fast keep and the smallest slow one
            guess = self._clamp(between(max(fast), min(slow), aim))
        else:  # one side: step from the last probe
            guess = self._step(self.measured[-1], aim)
        return None if any(math.isclose(guess, k, rel_tol=1e-9) for k, _ in self.measured) else guess

    def result(self) -> tuple[float, float]:
        """(keep, ratio): the largest keep at least as fast as the band's lower edge (the most work
        kept at the speed), else the fastest probe."""
        fast = [p for p in self.measured if p[1] >= self.band[0]]
        if fast:
            return max(fast)
        return max(self.measured, key=lambda p: p[1])

    def level(self, ratio: float) -> float:
        """The keep at which the ratio is estimated to be `ratio`: interpolated between the largest
        keep that ran at least that fast and the smallest that ran slower, where the probes bracket it
        in that order; else a step from the probe nearest it, by the measured slope (`next`'s
        one-sided step)."""
        fast = [p for p in self.measured if p[1] >= ratio]
        slow = [p for p in self.measured if p[1] < ratio]
        if fast and slow and max(fast)[0] < min(slow)[0]:
            return between(max(fast), min(slow), ratio)
        return self._step(min(self.measured, key=lambda p: abs(math.log(p[1] / ratio))), ratio)

    @property
    def aim(self) -> float:
        """The ratio a search aims at: the band's geometric centre."""
        return math.sqrt(self.band[0] * self.band[1])

    def _step(self, probe: tuple[float, float], ratio: float) -> float:
        """The keep at `ratio` from one probe (keep, ratio), by the slope of the last two probes, or
        speed as 1 / keep."""
        keep, measured = probe
        return self._clamp(keep * (measured / ratio) ** (1.0 / self._slope()))

    def _slope(self) -> float:
        """-d log ratio / d log keep from the last two probes (1 where unknown or not falling)."""
        if len(self.measured) < 2:
            return 1.0
        (k1, r1), (k2, r2) = self.measured[-2:]
        if k1 == k2 or r1 <= 0 or r2 <= 0:
            return 1.0
        slope = -(math.log(r2) - math.log(r1)) / (math.log(k2) - math.log(k1))
        return slope if slope > 0.1 else 1.0

    def _clamp(self, keep: float) -> float:
        return min(1.0, max(self.lowest, keep))


def between(fast: tuple[float, float], slow: tuple[float, float], ratio: float) -> float:
    """The keep at which the ratio is `ratio`, by interpolation in log keep against log ratio
    between two probes (keep, ratio), one faster than it and one slower."""
    (k1, r1), (k2, r2) = fast, slow
    at = math.log(r1 / ratio) / (math.log(r1) - math.log(r2))
    return math.exp(math.log(k1) + at * (math.log(k2) - math.log(k1)))


def lowest_keep(runs: Callable[[float], bool], steps: int = 30) -> float:
    """The least keep (to within 2**-steps) at which `runs(keep)` holds, `runs` monotone in keep (a
    method's schedule exists): the lower bound of a `KeepSearch`."""
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if runs(mid) else (mid, hi)
    return hi


@dataclass
class Probe:
    """One search: its configuration at a keep (`make`), and the index of its target in `match`'s
    targets."""

    make: Callable[[float], Config]
    search: KeepSearch
    target: int = 0


Target = Config | float  # a baseline whose speed is measured with the probes, or a speedup over full


def match(
    task: measure.Task,
    targets: list[Target],
    probes: dict[Hashable, Probe],
    repeats: int,
    step: Callable[[str], None] = lambda _: None,
) -> None:
    """Run every probe's search, a step at a time: each step times its pending probes together
    with the baseline targets (and the full model where a target is a speedup) in `repeats`
    interleaved rounds, and gives each probe its median speed over its target's."""
    baselines = [i for i, t in enumerate(targets) if isinstance(t, Config)]
    with_full = len(baselines) < len(targets)
    while True:
        pending = [(p, keep) for p in probes.values() if (keep := p.search.next()) is not None]
        if not pending:
            return
        configs = [*([FULL] if with_full else []), *(targets[i] for i in baselines)]
        passes = timings(task, [*configs, *(p.make(k) for p, k in pending)], repeats, step)
        seconds = [statistics.median(x.seconds for x in timed) for timed in passes]
        base = dict(zip(baselines, seconds[int(with_full) :], strict=False))
        for (p, keep), own in zip(pending, seconds[len(configs) :], strict=True):
            target = targets[p.target]
            ratio = base[p.target] / own if p.target in base else seconds[0] / own / target
            p.search.record(keep, ratio)
