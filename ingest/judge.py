"""Rules 7 to 9 of docs/spec/reading-v1.md section 9, decided from what the database holds.

The store adapter locks the batch's meters and asks, for each candidate, only what the
rules need of the stored readings (`StoredContext`): the hash stored under its seq, the
nearest stored readings before and after its ts, and how many stored readings fall in its
rate window. This module then decides in arrival order, reading by reading. Readings
accepted earlier in the same batch count as stored, so a batch is judged exactly as if it
arrived one by one.

Why a context per candidate rather than each meter's stored readings: a meter reporting
every second has a full rate window (60 readings) stored; carrying those rows to the
worker for every reading cost more CPU than verifying its signature (measured under live
load: 37% of the worker's CPU). The database counts them where they are.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from meterproof.ingest.records import Accepted, Candidate, Duplicate, Outcome, Rejection
from meterproof.schemas.reading import RejectReason


@dataclass(frozen=True, slots=True)
class StoredPoint:
    """A stored reading as the register and rate rules see it."""

    ts_ms: int
    import_wh: int
    export_wh: int


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `max_readings` per `window_ms` of *meter* time (ts), not of arrival time:
    a meter uploading a week of buffered readings at once is not flooding."""

    window_ms: int = 60_000
    max_readings: int = 60

    def __post_init__(self) -> None:
        if self.window_ms <= 0 or self.max_readings < 1:
            raise ValueError("rate limit needs window_ms > 0 and max_readings >= 1")

    def window_start(self, ts_ms: int) -> int:
        """The first ts of the window ending at (and including) `ts_ms`."""
        return ts_ms - self.window_ms + 1


@dataclass(frozen=True, slots=True)
class StoredContext:
    """What is stored around one candidate, before its batch."""

    reading_hash: bytes | None  # stored under the candidate's (meter_id, seq); b"": retired
    in_window: int  # stored readings of the meter in its rate window, up to max_readings
    before: StoredPoint | None  # the latest stored reading with an earlier ts
    after: StoredPoint | None  # the earliest stored reading with a later ts


@dataclass(slots=True)
class _Timeline:
    """One meter's points in ts order; equal ts keep their insertion order."""

    ts: list[int] = field(default_factory=list)
    points: list[StoredPoint] = field(default_factory=list)

    def add(self, point: StoredPoint) -> None:
        i = bisect.bisect_right(self.ts, point.ts_ms)
        self.ts.insert(i, point.ts_ms)
        self.points.insert(i, point)

    def before(self, ts_ms: int) -> StoredPoint | None:
        i = bisect.bisect_left(self.ts, ts_ms)
        return self.points[i - 1] if i else None

    def after(self, ts_ms: int) -> StoredPoint | None:
        i = bisect.bisect_right(self.ts, ts_ms)
        return self.points[i] if i < len(self.points) else None

    def count_in(self, start_ms: int, end_ms: int) -> int:
        return bisect.bisect_right(self.ts, end_ms) - bisect.bisect_left(self.ts, start_ms)


def context_of(
    candidates: Sequence[Candidate],
    *,
    seen: Mapping[tuple[str, int], bytes],
    history: Mapping[str, Iterable[StoredPoint]],
    limit: RateLimit,
) -> list[StoredContext]:
    """The contexts from stored readings held in memory (the fuzzer's store, tests); the
    store adapter gets the same from PostgreSQL, and a test holds the two equal."""
    timelines: dict[str, _Timeline] = {}
    contexts: list[StoredContext] = []
    for c in candidates:
        r = c.reading
        timeline = timelines.get(r.meter_id)
        if timeline is None:
            timeline = timelines[r.meter_id] = _Timeline()
            for point in history.get(r.meter_id, ()):
                timeline.add(point)
        contexts.append(
            StoredContext(
                seen.get((r.meter_id, r.seq)),
                min(limit.max_readings, timeline.count_in(limit.window_start(r.ts), r.ts)),
                timeline.before(r.ts),
                timeline.after(r.ts),
            )
        )
    return contexts


def _register_violation(
    p: StoredPoint, before: StoredPoint | None, after: StoredPoint | None
) -> str | None:
    if before is not None and (p.import_wh < before.import_wh or p.export_wh < before.export_wh):
        return (
            f"registers ({p.import_wh}, {p.export_wh}) below ({before.import_wh}, "
            f"{before.export_wh}) stored at ts {before.ts_ms}"
        )
    if after is not None and (p.import_wh > after.import_wh or p.export_wh > after.export_wh):
        return (
            f"registers ({p.import_wh}, {p.export_wh}) above ({after.import_wh}, "
            f"{after.export_wh}) stored at later ts {after.ts_ms}"
        )
    return None


def _later(stored: StoredPoint | None, batch: StoredPoint | None) -> StoredPoint | None:
    """The nearer of two earlier neighbours; on a tie the batch's, accepted after the store's."""
    if stored is None or (batch is not None and batch.ts_ms >= stored.ts_ms):
        return batch
    return stored


def _earlier(stored: StoredPoint | None, batch: StoredPoint | None) -> StoredPoint | None:
    """The nearer of two later neighbours; on a tie the store's."""
    if stored is None or (batch is not None and batch.ts_ms < stored.ts_ms):
        return batch
    return stored


def judge(
    candidates: Sequence[Candidate],
    contexts: Sequence[StoredContext],
    *,
    limit: RateLimit,
) -> list[Outcome]:
    """One outcome per candidate, in order; `contexts[i]` is what is stored around
    `candidates[i]`."""
    if len(contexts) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates but {len(contexts)} stored contexts")
    accepted_by_meter: dict[str, _Timeline] = {}
    taken: dict[tuple[str, int], bytes] = {}
    outcomes: list[Outcome] = []
    for c, stored in zip(candidates, contexts, strict=True):
        r = c.reading
        key = (r.meter_id, r.seq)

        def reject(reason: RejectReason, detail: str, c: Candidate = c) -> Rejection:
            return Rejection(
                c.message, reason, detail, c.reading.meter_id, c.reading.seq, c.reading_hash
            )

        known = taken.get(key, stored.reading_hash)
        if known is not None:
            outcomes.append(
                Duplicate(c)
                if known == c.reading_hash
                else reject(
                    RejectReason.SEQ_REUSED,
                    f"seq {r.seq} already stored as {known.hex() or 'a retired reading'}",
                )
            )
            continue
        batch = accepted_by_meter.get(r.meter_id)
        if batch is None:
            batch = accepted_by_meter[r.meter_id] = _Timeline()
        point = StoredPoint(r.ts, r.import_wh, r.export_wh)
        before = _later(stored.before, batch.before(r.ts))
        violation = _register_violation(point, before, _earlier(stored.after, batch.after(r.ts)))
        if violation is not None:
            outcomes.append(reject(RejectReason.REGISTER_DECREASED, violation))
            continue
        if stored.in_window + batch.count_in(limit.window_start(r.ts), r.ts) >= limit.max_readings:
            outcomes.append(
                reject(
                    RejectReason.RATE_LIMITED,
                    f"over {limit.max_readings} readings in {limit.window_ms} ms of meter time",
                )
            )
            continue
        batch.add(point)
        taken[key] = c.reading_hash
        outcomes.append(Accepted(c))
    return outcomes
