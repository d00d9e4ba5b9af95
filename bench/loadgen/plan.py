"""Pure arithmetic of a load run: who publishes what, when, with which seq and ts, and how
the figures are summarised. No I/O, so each rule is tested with plain values."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from meterproof.bench import sampling

#: Meter time between two readings of one meter. The worker limits a meter to 60 readings
#: per 60 s of meter time (docs/spec/reading-v1.md, rule 9), so one per second is the
#: densest honest pace.
TS_STEP_MS: Final = 1_000

#: Oldest reading we pre-sign, relative to now; far inside the 7-day maximum age.
MAX_BACKDATE_MS: Final = 6 * 24 * 3600 * 1000

#: Meters per generator process: each meter is one TLS socket, and a process may open at
#: most 20,000 files here (docs/platform.md); the rest is headroom for certificates being read.
METERS_PER_GENERATOR: Final = 9_000


def generator_count(meters: int, *, minimum: int = 2) -> int:
    """Two processes at least (two cores), more when the file limit demands it."""
    return max(minimum, math.ceil(meters / METERS_PER_GENERATOR))


def split(items: Sequence[str], parts: int) -> list[list[str]]:
    """Round-robin slices, so slice sizes differ by at most one."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, not {parts}")
    return [list(items[i::parts]) for i in range(parts)]


def share(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers differing by at most one, summing to `total`."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def broker_index(meter_id: str, brokers: int) -> int:
    """The broker a meter lives on when meters are sharded over `brokers`: a stable hash of
    its id (not round-robin), so its persistent session is always on the same one."""
    digest = hashlib.sha256(meter_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % brokers


def per_meter(readings: int, meters: int) -> int:
    """Readings the busiest meter of a round-robin over `meters` publishes."""
    return math.ceil(readings / meters) if meters else 0


def ts_base_ms(now_ms: int, max_seq: int) -> int:
    """The ts of seq 0: readings are pre-signed before they are sent, so their ts cannot be
    "now"; they are spread back in time, one TS_STEP_MS apart per meter, the last one still
    a minute in the past, hence never `timestamp_skew`, and all well within the max age."""
    span = max_seq * TS_STEP_MS + 60_000
    if span > MAX_BACKDATE_MS:
        raise ValueError(f"{max_seq} readings per meter do not fit in the acceptance window")
    return now_ms - span


def reading_ts(base_ms: int, seq: int) -> int:
    return base_ms + seq * TS_STEP_MS


def due(elapsed_s: float, rate: float, sent: int, total: int) -> int:
    """Token bucket without a burst cap: how many to send now so the cumulative count
    follows `rate` from the start, never past `total`. A late tick catches up, so a
    generator that keeps up publishes exactly `rate`; one that cannot falls behind, which
    the published/s figure shows."""
    if elapsed_s <= 0:
        return 0
    return max(0, min(total, int(elapsed_s * rate)) - sent)


def percentile(values: Sequence[float], q: float) -> float | None:
    """`bench.sampling.percentile`, None when there are no values (a tier without
    receipts)."""
    return float(sampling.percentile(values, q)) if values else None


def latency_summary(sorted_ms: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(sorted_ms, 50),
        "p95": percentile(sorted_ms, 95),
        "p99": percentile(sorted_ms, 99),
        "max": float(sorted_ms[-1]) if sorted_ms else None,
        "count": len(sorted_ms),
    }


def add_series(series: Sequence[Sequence[int]]) -> list[int]:
    """Element-wise sum of per-process per-second counts of unequal length."""
    length = max((len(s) for s in series), default=0)
    return [sum(s[i] for s in series if i < len(s)) for i in range(length)]


def cumulative(values: Sequence[int]) -> list[int]:
    out, running = [], 0
    for v in values:
        running += v
        out.append(running)
    return out


def backlog_series(published: Sequence[int], receipted: Sequence[int]) -> list[int]:
    """Per second: readings published and not yet receipted (by the end of that second)."""
    pub, rec = cumulative(published), cumulative(receipted)
    length = max(len(pub), len(rec))
    pub += [pub[-1] if pub else 0] * (length - len(pub))
    rec += [rec[-1] if rec else 0] * (length - len(rec))
    return [p - r for p, r in zip(pub, rec, strict=True)]


def backlog_growth(backlog: Sequence[int]) -> float:
    """Readings/s the backlog grows by while publishing: mean of the last quarter minus
    mean of the second quarter, over the time between them. The first quarter is the ramp
    (caches, batches filling) and is left out; needs at least 4 seconds."""
    n = len(backlog)
    if n < 4:
        return 0.0
    q = n // 4
    early = backlog[q : 2 * q]
    late = backlog[n - q :]
    gap = (n - q / 2) - (q + q / 2)
    return (sum(late) / len(late) - sum(early) / len(early)) / gap


@dataclass(frozen=True, slots=True)
class Verdict:
    sustained: bool
    why: str


def sustained(
    *,
    offered_per_s: float,
    published: int,
    expected: int,
    growth_per_s: float,
    unreceipted: int,
    stored: int,
) -> Verdict:
    """A rate is sustained when the generator offered it (98% published), the backlog did
    not grow by more than 1% of the rate per second, every published reading got its
    receipt by the end of the grace period, and every one was stored: a receipt that
    rejects is quick too, so receipts alone do not show that ingest kept up."""
    if published < 0.98 * expected:
        return Verdict(False, f"generator published only {published} of {expected}")
    if growth_per_s > 0.01 * offered_per_s:
        return Verdict(False, f"backlog grew by {growth_per_s:.0f} readings/s")
    if unreceipted:
        return Verdict(False, f"{unreceipted} readings without a receipt after the grace period")
    if stored < published:
        return Verdict(False, f"only {stored} of {published} published readings stored")
    return Verdict(True, "no backlog growth, every reading receipted and stored")


def next_probe(results: Sequence[tuple[int, bool]], resolution: int) -> int | None:
    """The next rate to offer in the search for the highest sustained one: halfway between
    the highest sustained rate and the lowest unsustained rate above it, on a `resolution`
    grid; None when nothing was sustained or failed above, or the two are a step apart."""
    held = [rate for rate, ok in results if ok]
    if not held:
        return None
    best = max(held)
    above = [rate for rate, ok in results if not ok and rate > best]
    if not above:
        return None
    lowest_failed = min(above)
    probe = round((best + lowest_failed) / 2 / resolution) * resolution
    return probe if best < probe < lowest_failed else None


def half_rate(best: int, measured: Sequence[int], resolution: int) -> int | None:
    """Half the highest sustained rate, down to the `resolution` grid, where the latency
    target is judged; None if that rate was measured already (or rounds to nothing)."""
    half = best // 2 // resolution * resolution
    return None if half <= 0 or half in measured else half
