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


def work(schedule: Sequence[float]) -> float:
    """Fraction of token-layer work kept by a schedule of L + 1 points (1.0 = nothing removed)."""
    pairs = list(pairwise(schedule))
    return sum((a + b) / 2 for a, b in pairs) / len(pairs)


def check_keep(keep: float) -> float:
    if isinstance(keep, bool) or not isinstance(keep, int | float) or not 0.0 < keep <= 1.0:
        raise ValueError(
            f"keep must be a fraction of the work in (0, 1], got {keep!r}: "
            "1.0 removes nothing, 0.5 halves the token-layer work"
        )
    return float(keep)


def check_schedule(schedule: Sequence[float], num_layers: int) -> list[float]:
    schedule = [float(f) for f in schedule]
    if len(schedule) != num_layers + 1:
        raise ValueError(
            f"schedule has {len(schedule)} entries but a {num_layers}-layer model has "
            f"{num_layers + 1} reduction points (after the embeddings, then after each attention)"
        )
    if any(not 0.0 < f <= 1.0 for f in schedule) or any(b > a for a, b in pairwise(schedule)):
        raise ValueError(f"schedule must be non-increasing fractions in (0, 1], got {schedule}")
    return schedule


def bracket(
    work_of: Callable[[float], float], keep: float, lo: float, hi: float, steps: int = 60
) -> tuple[float, float]:
    """Bisection on a schedule's parameter, whose work rises with it: the bracket around `keep`."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if work_of(mid) < keep else (lo, mid)
    return lo, hi


def geometric(keep: float, num_layers: int, at_embeddings: bool = True) -> list[float]:
    """Each reduction point keeps the same fraction q of its tokens, q chosen so the work is `keep`.

    Constant-ratio rather than ToMe's constant count: on a 6-layer text encoder a constant count
    that halves the work would leave no tokens at the last layer. at_embeddings=False leaves the
    first point alone, for methods that score tokens by the layer's attention.
    """
    keep = check_keep(keep)
    first = 0 if at_embeddings else 1
    if keep == 1.0:
        return [1.0] * (num_layers + 1)

    def shape(q: float) -> list[float]:
        return [1.0] * first + [q ** (i + 1) for i in range(num_layers + 1 - first)]

    if keep <= work(shape(0.0)):
        raise ValueError(f"keep {keep} is below what this method can reach on {num_layers} layers")
    _, hi = bracket(lambda q: work(shape(q)), keep, 0.0, 1.0)
    return shape(hi)


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
    return out if out[-1] > 0 and abs(work(out) - keep) < 1e-6 else None
