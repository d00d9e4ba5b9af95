"""Exponential backoff with jitter, one definition for the worker, bridge and meter."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


def backoff_s(failures: int, *, initial: float, maximum: float, jitter: float) -> float:
    """The delay after `failures` consecutive failures (1 for the first): exponential,
    capped, with "equal jitter" (half fixed, half random; `jitter` in [0, 1)), so retries
    of many clients spread out but none waits less than half its step."""
    ceiling = min(maximum, initial * 2.0 ** min(max(failures - 1, 0), 64))
    return ceiling / 2 + ceiling / 2 * jitter


@dataclass(slots=True)
class Backoff:
    """Counts consecutive failures; `next_s()` after each, `reset()` after a success."""

    initial: float
    maximum: float
    jitter: Callable[[], float] = field(default=random.random)
    failures: int = 0

    def __post_init__(self) -> None:
        if self.initial <= 0:
            raise ValueError("initial must be positive")
        if self.maximum < self.initial:
            raise ValueError("maximum must be at least initial")

    def next_s(self) -> float:
        self.failures += 1
        return backoff_s(
            self.failures, initial=self.initial, maximum=self.maximum, jitter=self.jitter()
        )

    def reset(self) -> None:
        self.failures = 0
