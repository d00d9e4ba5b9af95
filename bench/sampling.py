"""Small pure helpers over measured samples, kept apart so they can be tested with plain
values: rates from a running count, percentiles, and how far a figure is from a target."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Sample = tuple[float, int]  # (seconds since the start, running count)


def rates(samples: Sequence[Sample], *, window_s: float = 1.0) -> list[tuple[float, float]]:
    """(end of window, count per second over the window) from a running count sampled at
    irregular times; windows start at the first sample and close at the first sample at or
    past `window_s` later, so no window is shorter than `window_s` (noise from the polling
    interval stays out of the curve)."""
    if window_s <= 0:
        raise ValueError("window_s must be > 0")
    out: list[tuple[float, float]] = []
    if not samples:
        return out
    start_t, start_n = samples[0]
    for t, n in samples[1:]:
        if t - start_t >= window_s:
            out.append((t, (n - start_n) / (t - start_t)))
            start_t, start_n = t, n
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): always a value that was measured."""
    if not values:
        raise ValueError("no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class Verdict:
    """A measured figure against its target; `ratio` > 1 means better than the target."""

    met: bool
    ratio: float


def at_least(measured: float, target: float) -> Verdict:
    return Verdict(measured >= target, measured / target)


def at_most(measured: float, target: float) -> Verdict:
    """`<=` (a target "<= 150 µs", "within 2x"); lower is better (a time, a cost): ratio =
    target / measured."""
    return Verdict(measured <= target, _lower_ratio(measured, target))


def below(measured: float, target: float) -> Verdict:
    """`<` (a target "< 50 ms"), as `at_most` otherwise."""
    return Verdict(measured < target, _lower_ratio(measured, target))


def _lower_ratio(measured: float, target: float) -> float:
    return target / measured if measured > 0 else math.inf
