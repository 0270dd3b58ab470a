"""The budget: `keep` is the fraction of token-layer work kept, and a schedule says how many tokens
remain after each reduction point.

A model with L layers has L + 1 reduction points: after the embeddings (point 0) and between
each layer's attention and its MLP (point l + 1 for layer l). A schedule gives, for each point, the
fraction of the original (real) tokens left after it. Layer l runs its attention on what point l
left and its MLP on what point l + 1 left, so its work is the mean of the two, relative to the
unreduced model; `keep` is that work averaged over layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from numbers import Real

#: a schedule spends a budget when its work is within this of it
WORK_TOLERANCE = 1e-6


def work(schedule: Sequence[float]) -> float:
    """Fraction of token-layer work kept by a schedule of L + 1 points (1.0 = nothing removed)."""
    pairs = list(pairwise(schedule))
    return sum((a + b) / 2 for a, b in pairs) / len(pairs)


def check_keep(keep: float) -> float:
    if isinstance(keep, bool) or not isinstance(keep, Real):
        raise ValueError(
            f"keep must be a number (a fraction of the work in (0, 1]), got {keep!r}, a "
            f"{type(keep).__name__}: pass a number such as 0.5"
        )
    if not 0.0 < keep <= 1.0:
        raise ValueError(
            f"keep must be a fraction of the work in (0, 1], got {keep!r}: "
            "1.0 removes nothing, 0.5 halves the token-layer work"
        )
    return float(keep)


class LayerCountError(ValueError):
    """A schedule made for a model with another number of layers (a configuration found on another
    model): raised apart so that a caller can say where the schedule came from."""

    def __init__(self, entries: int, num_layers: int) -> None:
        self.entries, self.num_layers = entries, num_layers
        super().__init__(
            f"schedule has {entries} entries but a {num_layers}-layer model has "
            f"{num_layers + 1} reduction points (after the embeddings, then after each attention)"
        )


def check_fractions(schedule: Sequence[float]) -> list[float]:
    """A schedule's own checks, those that need no model: at least two points, non-increasing
    fractions in (0, 1]."""
    schedule = [float(f) for f in schedule]
    if len(schedule) < 2:
        raise ValueError(
            f"a schedule gives the fraction of tokens left after each of a model's reduction points "
            f"(the embeddings, then each attention: at least 2), got {schedule}"
        )
    if any(not 0.0 < f <= 1.0 for f in schedule) or any(b > a for a, b in pairwise(schedule)):
        raise ValueError(f"schedule must be non-increasing fractions in (0, 1], got {schedule}")
    return schedule


def check_schedule(schedule: Sequence[float], num_layers: int) -> list[float]:
    schedule = check_fractions(schedule)
    if len(schedule) != num_layers + 1:
        raise LayerCountError(len(schedule), num_layers)
    return schedule


def _constant_ratio(q: float, num_layers: int, first: int) -> list[float]:
    """Points before `first` left whole, then each keeping the fraction q of the tokens entering it."""
    return [1.0] * first + [q ** (i + 1) for i in range(num_layers + 1 - first)]


def least_work(num_layers: int, at_embeddings: bool = True, max_removal: float = 1.0) -> float:
    """The work of the most aggressive schedule a method can follow: every reduction point (after an
    attention only, for at_embeddings=False) removing `max_removal` of the tokens entering it. Only
    budgets above it are reached (with max_removal 1 that schedule would leave no tokens at all).
    An idealisation: protected tokens and rounding to whole tokens keep a few tokens more per point,
    a share that shrinks with the sequence's length."""
    return work(_constant_ratio(1.0 - max_removal, num_layers, 0 if at_embeddings else 1))


def check_reach(keep: float, num_layers: int, at_embeddings: bool = True, max_removal: float = 1.0) -> None:
    """Refuse a budget that a method removing at most `max_removal` of the tokens entering each
    reduction point cannot reach on num_layers layers (see `least_work`)."""
    least = least_work(num_layers, at_embeddings, max_removal)
    if keep < 1.0 and keep <= least:
        share = "up to all" if max_removal >= 1.0 else f"at most {max_removal:g}"
        points = "each reduction point" if at_embeddings else "each reduction point after an attention"
        raise ValueError(
            f"keep {keep:.6g} is below what can be reached on {num_layers} layers removing {share} of "
            f"the tokens entering {points}: keep must be above {least:.6g}"
        )


def bracket(
    work_of: Callable[[float], float], keep: float, lo: float, hi: float, steps: int = 60
) -> tuple[float, float]:
    """Bisection on a schedule's parameter, whose work rises with it: the bracket around `keep`."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if work_of(mid) < keep else (lo, mid)
    return lo, hi


def geometric(
    keep: float, num_layers: int, at_embeddings: bool = True, max_removal: float = 1.0
) -> list[float]:
    """Each reduction point keeps the same fraction q of its tokens, q chosen so the work is `keep`.

    Constant-ratio rather than ToMe's constant count: on a 6-layer text encoder a constant count
    that halves the work would leave no tokens at the last layer. at_embeddings=False leaves the
    first point alone, for methods that score tokens by the layer's attention. max_removal: the
    largest share of the tokens entering a point that the method can remove there, so q is at
    least 1 - max_removal (bipartite matching: about half); a keep below that reach is refused.
    """
    keep = check_keep(keep)
    first = 0 if at_embeddings else 1
    if keep == 1.0:
        return [1.0] * (num_layers + 1)
    check_reach(keep, num_layers, at_embeddings, max_removal)
    _, hi = bracket(lambda q: work(_constant_ratio(q, num_layers, first)), keep, 1.0 - max_removal, 1.0)
    return _constant_ratio(hi, num_layers, first)


def power(keep: float, num_layers: int, gamma: float, first: int = 0) -> list[float]:
    """A family of schedules for calibration: nothing removed before point `first`, then the share
    of tokens left falls as 1 - (1 - end) * t**gamma over the remaining points (t = 1/n .. 1), `end`
    chosen so that the work is `keep`. gamma < 1 removes most tokens early, gamma > 1 late; as gamma
    goes to 0 the schedule is flat at about `keep` from point `first` on."""
    keep = check_keep(keep)
    n = num_layers + 1 - first

    def shape(end: float) -> list[float]:
        return [1.0] * first + [1 - (1 - end) * ((i + 1) / n) ** gamma for i in range(n)]

    if keep == 1.0:
        return [1.0] * (num_layers + 1)
    if keep <= work(shape(0.0)):
        raise ValueError(f"keep {keep} is below what this schedule shape can reach on {num_layers} layers")
    lo, _ = bracket(lambda end: work(shape(end)), keep, 0.0, 1.0)
    return shape(lo)


def nudge(schedule: Sequence[float], point: int, factor: float) -> list[float] | None:
    """The schedule with one point's share of tokens scaled by `factor`, and the other reduced points
    rescaled together so that the work stays the same (kept non-increasing); None if that cannot be.
    Points left whole (1.0) stay whole: a method may be unable to reduce there."""
    keep = work(schedule)
    free = [i for i, f in enumerate(schedule) if f < 1.0 and i != point]
    if schedule[point] >= 1.0 or not free:
        return None

    def shape(c: float) -> list[float]:
        out, prev = [], 1.0
        for i, f in enumerate(schedule):
            f = f * factor if i == point else f * c if i in free else f
            prev = min(prev, f, 1.0)
            out.append(prev)
        return out

    lo, hi = 0.0, 1.0 / min(schedule[i] for i in free)
    if not work(shape(lo)) <= keep <= work(shape(hi)):
        return None
    lo, _ = bracket(lambda c: work(shape(c)), keep, lo, hi, steps=50)
    out = shape(lo)
    return out if out[-1] > 0 and abs(work(out) - keep) < WORK_TOLERANCE else None
