"""Epoch arithmetic on unix milliseconds, aligned to the wall clock (pure).

Epoch `e` of length `L` ms covers [e*L, (e+1)*L): with L = 900,000 the epochs start at
:00, :15, :30 and :45 of every hour. A batch for epoch `e` claims every unclaimed reading
with ts < end(e); it is sealed once the wall clock passes end(e) plus a grace delay, so
readings taken just before the boundary are not needlessly late.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Epoch:
    index: int
    length_ms: int

    def __post_init__(self) -> None:
        if self.length_ms <= 0 or self.index < 0:
            raise ValueError("an epoch needs length_ms > 0 and index >= 0")

    @property
    def start_ms(self) -> int:
        return self.index * self.length_ms

    @property
    def end_ms(self) -> int:
        return (self.index + 1) * self.length_ms

    def due(self, now_ms: int, delay_ms: int) -> bool:
        """True once the epoch has closed and its grace delay has passed."""
        return now_ms >= self.end_ms + delay_ms


def containing(ts_ms: int, length_ms: int) -> Epoch:
    return Epoch(max(ts_ms, 0) // length_ms, length_ms)


def next_epoch(*, previous_end_ms: int | None, oldest_unclaimed_ms: int, length_ms: int) -> Epoch:
    """The epoch a new batch opens for: the oldest unclaimed reading's epoch, but never one
    that starts before the previous batch's epoch ended (epochs only move forward, even
    across a change of epoch length). A late reading therefore rides with the next batch.
    """
    candidate = containing(oldest_unclaimed_ms, length_ms)
    if previous_end_ms is None or candidate.start_ms >= previous_end_ms:
        return candidate
    return Epoch(-(-previous_end_ms // length_ms), length_ms)
