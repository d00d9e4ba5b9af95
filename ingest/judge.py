"""Rules 7 to 9 of docs/spec/reading-v1.md section 9, decided from what the database holds.

The store adapter locks the batch's meters and asks, for each candidate, only what the
rules need of the stored readings (`StoredContext`): the hash stored under its seq, the
nearest stored readings before and after it in (ts, seq) order, and how many stored
readings fall in its rate window. This module then decides in arrival order, reading by
reading. Readings accepted earlier in the same batch count as stored, so a batch is judged
exactly as if it arrived one by one. Under the same lock the store reads each meter's
status again (rule 3, decided before from the worker's cached snapshot): `judge` refuses
the readings of a meter quarantined or decommissioned meanwhile.

Why a context per candidate rather than each meter's stored readings: a meter reporting
every second has a full rate window (60 readings) stored; carrying those rows to the
worker for every reading cost more CPU than verifying its signature (measured under live
load: 37% of the worker's CPU). The database counts them where they are.

Rule 9 holds when no window of `window_ms` of meter time holds more than `max_readings`
readings of a meter, the new one included. When nothing stored or accepted lies after a
reading by less than a window, every window holding it holds only readings at or before
it, all of them in the window that ends at it: that one count is exact. It is the common
case, each meter's readings arriving in rising ts. A reading that arrives before others
of its meter (late, or a meter whose ts goes down) can fill a window that starts before it
and ends after it. For such a reading only, the store also counts the stored readings
less than a window after it (`StoredContext.ahead`): when the readings within a window
either side, stored and of the batch, cannot fill one window, it passes (a 2-worker drain
of readings 5 s apart is all such readings: one worker stores what the other's batch
holds before). Only where they could, the store brings their ts values
(`StoredContext.around`, a second statement) and the judge counts every window holding it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from meterproof.ingest.records import Accepted, Candidate, Duplicate, Outcome, Rejection
from meterproof.schemas.reading import RejectReason


@dataclass(frozen=True, slots=True)
class StoredPoint:
    """A stored reading as the register and rate rules see it. Rule 8 orders readings by
    (ts, seq): of two with the same ts, the one with the lower seq comes first."""

    ts_ms: int
    import_wh: int
    export_wh: int
    seq: int


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `max_readings` per `window_ms` of *meter* time (ts), not of arrival time:
    a meter uploading a week of buffered readings at once is not flooding. A window is
    `window_ms` consecutive ms of ts: the one ending at ts is (ts - window_ms, ts]."""

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
    before: StoredPoint | None  # the stored reading just before it in (ts, seq) order
    after: StoredPoint | None  # the stored reading just after it in (ts, seq) order
    #: Only where the window ending at the candidate may not be the fullest one holding it
    #: (`after` less than a window after it, or `overtaken`): the stored readings in
    #: (ts, ts + window_ms), up to max_readings.
    ahead: int | None = None
    #: Only where, besides, `needs_around`: the stored ts values in (ts - window_ms, ts +
    #: window_ms), ascending; on each side of ts (at or before it, after it) only the
    #: nearest `max_readings`, as more on one side already fill a window.
    around: tuple[int, ...] | None = None


def needs_around(in_window: int, ahead: int, near: int, limit: RateLimit) -> bool:
    """Whether the stored readings within a window either side of a candidate (`in_window`
    at or before it, `ahead` after it) and `near` other candidates of its meter in the
    batch (`batch_near`) could fill a window with it: only then are their times needed."""
    return in_window + ahead + near + 1 > limit.max_readings


def batch_near(
    meter_ids: Sequence[str], ts: Sequence[int], *, limit: RateLimit
) -> Callable[[int], int]:
    """For candidate i, how many other candidates of its meter have a ts within a window
    either side of its own, (ts - window_ms, ts + window_ms), whatever their order."""
    by_meter: dict[str, list[int]] = {}
    for meter_id, t in zip(meter_ids, ts, strict=True):
        by_meter.setdefault(meter_id, []).append(t)
    for times in by_meter.values():
        times.sort()
    window = limit.window_ms

    def near(i: int) -> int:
        times, t = by_meter[meter_ids[i]], ts[i]
        return bisect.bisect_left(times, t + window) - bisect.bisect_right(times, t - window) - 1

    return near


@dataclass(slots=True)
class _Timeline:
    """One meter's points in (ts, seq) order; equal keys keep their insertion order."""

    keys: list[tuple[int, int]] = field(default_factory=list)
    points: list[StoredPoint] = field(default_factory=list)

    def add(self, point: StoredPoint) -> None:
        key = (point.ts_ms, point.seq)
        i = bisect.bisect_right(self.keys, key)
        self.keys.insert(i, key)
        self.points.insert(i, point)


def overtaken(
    meter_ids: Sequence[str], ts: Sequence[int], *, limit: RateLimit
) -> list[bool] | None:
    """For each candidate (its meter and ts, in arrival order), whether an earlier one of
    its meter has a ts after its own by less than a window (`StoredContext.around` is then
    needed). None when none has: the common case, each meter's readings in rising ts,
    costs a dict lookup each."""
    latest: dict[str, int] = {}
    for meter_id, t in zip(meter_ids, ts, strict=True):
        if latest.get(meter_id, t) > t:
            break
        latest[meter_id] = t
    else:
        return None
    times: dict[str, list[int]] = {}
    flags = [False] * len(ts)
    for n, (meter_id, t) in enumerate(zip(meter_ids, ts, strict=True)):
        seen = times.setdefault(meter_id, [])
        i = bisect.bisect_right(seen, t)
        seen.insert(i, t)
        flags[n] = i + 1 < len(seen) and seen[i + 1] < t + limit.window_ms
    return flags if any(flags) else None


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
    meter_ids, times = [c.reading.meter_id for c in candidates], [c.reading.ts for c in candidates]
    early = overtaken(meter_ids, times, limit=limit)
    near = batch_near(meter_ids, times, limit=limit)
    for n, c in enumerate(candidates):
        r = c.reading
        timeline = timelines.get(r.meter_id)
        if timeline is None:
            timeline = timelines[r.meter_id] = _Timeline()
            for point in history.get(r.meter_id, ()):
                timeline.add(point)
        keys, points = timeline.keys, timeline.points
        first = bisect.bisect_left(keys, (r.ts, r.seq))
        last = bisect.bisect_right(keys, (r.ts, r.seq))
        after = points[last] if last < len(points) else None
        start = bisect.bisect_left(keys, (limit.window_start(r.ts),))
        end = bisect.bisect_left(keys, (r.ts + 1,))
        in_window = min(limit.max_readings, end - start)
        ahead = around = None
        if (early is not None and early[n]) or (
            after is not None and after.ts_ms < r.ts + limit.window_ms
        ):
            stop = bisect.bisect_left(keys, (r.ts + limit.window_ms,))
            ahead = min(limit.max_readings, stop - end)
            if needs_around(in_window, ahead, near(n), limit):
                around = tuple(
                    k[0]
                    for k in keys[max(start, end - limit.max_readings) : end]
                    + keys[end : min(stop, end + limit.max_readings)]
                )
        contexts.append(
            StoredContext(
                seen.get((r.meter_id, r.seq)),
                in_window,
                points[first - 1] if first else None,
                after,
                ahead,
                around,
            )
        )
    return contexts


def _register_violation(
    p: StoredPoint, before: StoredPoint | None, after: StoredPoint | None
) -> str | None:
    if before is not None and (p.import_wh < before.import_wh or p.export_wh < before.export_wh):
        return (
            f"registers ({p.import_wh}, {p.export_wh}) below ({before.import_wh}, "
            f"{before.export_wh}) stored at ts {before.ts_ms} seq {before.seq}"
        )
    if after is not None and (p.import_wh > after.import_wh or p.export_wh > after.export_wh):
        return (
            f"registers ({p.import_wh}, {p.export_wh}) above ({after.import_wh}, "
            f"{after.export_wh}) stored at ts {after.ts_ms} seq {after.seq}"
        )
    return None


def _later(stored: StoredPoint | None, batch: StoredPoint | None) -> StoredPoint | None:
    """The nearer of two earlier neighbours; on a tie the batch's, accepted after the store's."""
    if stored is None or (
        batch is not None and (batch.ts_ms, batch.seq) >= (stored.ts_ms, stored.seq)
    ):
        return batch
    return stored


def _earlier(stored: StoredPoint | None, batch: StoredPoint | None) -> StoredPoint | None:
    """The nearer of two later neighbours; on a tie the store's."""
    if stored is None or (
        batch is not None and (batch.ts_ms, batch.seq) < (stored.ts_ms, stored.seq)
    ):
        return batch
    return stored


def _densest(times: Sequence[int], ts: int, window_ms: int) -> int:
    """The most of `times` (ascending, `ts` among them) that one window holding `ts` holds.
    The fullest such window starts at one of them, at or after ts - window_ms + 1 and at
    or before ts; a two-pointer sweep tries each."""
    most = end = 0
    for begin, first in enumerate(times):
        if first > ts:
            break
        if first <= ts - window_ms:
            continue
        end = max(end, begin)
        while end < len(times) and times[end] < first + window_ms:
            end += 1
        most = max(most, end - begin)
    return most


def _rate_limited(
    r_ts: int, at: int, stored: StoredContext, batch: _Timeline, limit: RateLimit
) -> bool:
    """Rule 9 for a reading at ts `r_ts` whose place among the batch's accepted points of
    its meter is `at`: True when some window holding it would hold more than the limit."""
    keys = batch.keys
    window = limit.window_ms
    start = bisect.bisect_left(keys, (limit.window_start(r_ts),), 0, at)
    end = at if at == len(keys) else bisect.bisect_left(keys, (r_ts + 1,), at)
    if stored.ahead is None:
        if (end < len(keys) and keys[end][0] < r_ts + window) or (
            stored.after is not None and stored.after.ts_ms < r_ts + window
        ):
            raise ValueError(f"readings follow ts {r_ts} within the rate window: need `ahead`")
        return stored.in_window + end - start >= limit.max_readings
    stop = bisect.bisect_left(keys, (r_ts + window,), end)
    if stored.around is None:  # too few within a window either side to fill one
        if needs_around(stored.in_window, stored.ahead, stop - start, limit):
            raise ValueError(f"readings within a window of ts {r_ts} may fill it: need `around`")
        return False
    times = sorted([*stored.around, *(k[0] for k in keys[start:stop]), r_ts])
    return _densest(times, r_ts, window) > limit.max_readings


def _reject(c: Candidate, reason: RejectReason, detail: str) -> Rejection:
    r = c.reading
    return Rejection(c.message, reason, detail, r.meter_id, r.seq, c.reading_hash)


def judge(
    candidates: Sequence[Candidate],
    contexts: Sequence[StoredContext],
    *,
    limit: RateLimit,
    halted: Mapping[str, str | None] | None = None,
) -> list[Outcome]:
    """One outcome per candidate, in order; `contexts[i]` is what is stored around
    `candidates[i]`. `halted`: meters whose readings rule 3 now refuses, read under the
    meter's lock, with their status (None: no longer registered)."""
    if len(contexts) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates but {len(contexts)} stored contexts")
    accepted_by_meter: dict[str, _Timeline] = {}
    taken: dict[tuple[str, int], bytes] = {}
    outcomes: list[Outcome] = []
    for c, stored in zip(candidates, contexts, strict=True):
        r = c.reading
        key = (r.meter_id, r.seq)
        if halted and r.meter_id in halted:
            status = halted[r.meter_id]
            outcomes.append(
                _reject(c, RejectReason.UNKNOWN_METER, "meter is not registered")
                if status is None
                else _reject(c, RejectReason.METER_NOT_ACTIVE, f"meter status is {status}")
            )
            continue
        known = taken.get(key, stored.reading_hash)
        if known is not None:
            outcomes.append(
                Duplicate(c)
                if known == c.reading_hash
                else _reject(
                    c,
                    RejectReason.SEQ_REUSED,
                    f"seq {r.seq} already stored as {known.hex() or 'a retired reading'}",
                )
            )
            continue
        batch = accepted_by_meter.get(r.meter_id)
        if batch is None:
            batch = accepted_by_meter[r.meter_id] = _Timeline()
        order = (r.ts, r.seq)
        at = bisect.bisect_left(batch.keys, order)  # never equal: an accepted seq is `taken`
        point = StoredPoint(r.ts, r.import_wh, r.export_wh, r.seq)
        violation = _register_violation(
            point,
            _later(stored.before, batch.points[at - 1] if at else None),
            _earlier(stored.after, batch.points[at] if at < len(batch.points) else None),
        )
        if violation is not None:
            outcomes.append(_reject(c, RejectReason.REGISTER_DECREASED, violation))
            continue
        if _rate_limited(r.ts, at, stored, batch, limit):
            outcomes.append(
                _reject(
                    c,
                    RejectReason.RATE_LIMITED,
                    f"over {limit.max_readings} readings in {limit.window_ms} ms of meter time",
                )
            )
            continue
        batch.keys.insert(at, order)
        batch.points.insert(at, point)
        taken[key] = c.reading_hash
        outcomes.append(Accepted(c))
    return outcomes
