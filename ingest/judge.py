"""Rules 7 to 9 of reading-v1 section 5, decided from what the database holds.

The store adapter locks the batch's meters, reads what is already stored (the hashes of
the batch's (meter_id, seq) and each meter's readings around the batch's timestamps), and
this module decides, in arrival order, reading by reading. Readings accepted earlier in the
same batch count as stored, so a batch is judged exactly as if it arrived one by one.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ingest.records import Accepted, Candidate, Duplicate, Outcome, Rejection
from schemas.reading import RejectReason


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


@dataclass(slots=True)
class _Timeline:
    ts: list[int] = field(default_factory=list)
    points: list[StoredPoint] = field(default_factory=list)

    def add(self, point: StoredPoint) -> None:
        i = bisect.bisect_right(self.ts, point.ts_ms)
        self.ts.insert(i, point.ts_ms)
        self.points.insert(i, point)

    def register_violation(self, p: StoredPoint) -> str | None:
        before = bisect.bisect_left(self.ts, p.ts_ms) - 1
        if before >= 0:
            prev = self.points[before]
            if p.import_wh < prev.import_wh or p.export_wh < prev.export_wh:
                return (
                    f"registers ({p.import_wh}, {p.export_wh}) below ({prev.import_wh}, "
                    f"{prev.export_wh}) stored at ts {prev.ts_ms}"
                )
        after = bisect.bisect_right(self.ts, p.ts_ms)
        if after < len(self.points):
            nxt = self.points[after]
            if p.import_wh > nxt.import_wh or p.export_wh > nxt.export_wh:
                return (
                    f"registers ({p.import_wh}, {p.export_wh}) above ({nxt.import_wh}, "
                    f"{nxt.export_wh}) stored at later ts {nxt.ts_ms}"
                )
        return None

    def count_in(self, start_ms: int, end_ms: int) -> int:
        return bisect.bisect_right(self.ts, end_ms) - bisect.bisect_left(self.ts, start_ms)


def judge(
    candidates: Sequence[Candidate],
    *,
    seen: Mapping[tuple[str, int], bytes],
    history: Mapping[str, Iterable[StoredPoint]],
    limit: RateLimit,
) -> list[Outcome]:
    """One outcome per candidate, in order. `seen` maps stored (meter_id, seq) to hash;
    `history` holds each meter's stored readings near the batch (see the store adapter)."""
    timelines: dict[str, _Timeline] = {}
    taken: dict[tuple[str, int], bytes] = dict(seen)
    outcomes: list[Outcome] = []
    for c in candidates:
        r = c.reading
        key = (r.meter_id, r.seq)

        def reject(reason: RejectReason, detail: str, c: Candidate = c) -> Rejection:
            return Rejection(
                c.message, reason, detail, c.reading.meter_id, c.reading.seq, c.reading_hash
            )

        known = taken.get(key)
        if known is not None:
            outcomes.append(
                Duplicate(c)
                if known == c.reading_hash
                else reject(RejectReason.SEQ_REUSED, f"seq {r.seq} already stored as {known.hex()}")
            )
            continue
        timeline = timelines.get(r.meter_id)
        if timeline is None:
            timeline = timelines[r.meter_id] = _Timeline()
            for point in history.get(r.meter_id, ()):
                timeline.add(point)
        point = StoredPoint(r.ts, r.import_wh, r.export_wh)
        violation = timeline.register_violation(point)
        if violation is not None:
            outcomes.append(reject(RejectReason.REGISTER_DECREASED, violation))
            continue
        if timeline.count_in(r.ts - limit.window_ms + 1, r.ts) >= limit.max_readings:
            outcomes.append(
                reject(
                    RejectReason.RATE_LIMITED,
                    f"over {limit.max_readings} readings in {limit.window_ms} ms of meter time",
                )
            )
            continue
        timeline.add(point)
        taken[key] = c.reading_hash
        outcomes.append(Accepted(c))
    return outcomes
