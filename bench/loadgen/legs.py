"""Where a live reading's publish -> receipt time goes, leg by leg.

The generator keeps each receipted reading's send and receipt times; its stored row says
when a worker received it (`received_at`), when its batch closed and was verified
(`verified_at`) and when its transaction began (`stored_at`, the transaction's `now()`).
All are wall-clock times of one machine, so the four legs add up to the latency the tier
reports, to the clock's resolution (the worker's times are whole milliseconds):

- to the worker: the generator's write, the broker, the worker's read;
- in the batch: waiting for the batch to close (the linger, a store still busy);
- to the transaction: decode, verify, the replay check, the hand-off to the store;
- commit and back: the transaction and its commit, the receipt through the broker.

The p99 target is about the slowest readings, so each leg is also given as its mean over
the slowest 1%: what those readings spent where.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from meterproof.bench.sampling import percentile

LEGS: Final = ("to the worker", "in the batch", "to the transaction", "commit and back")

_STORED: Final = """
SELECT u.i, extract(epoch FROM r.received_at) * 1000, extract(epoch FROM r.verified_at) * 1000,
       extract(epoch FROM r.stored_at) * 1000
FROM unnest(%s::text[], %s::numeric[]) WITH ORDINALITY AS u(meter_id, seq, i)
JOIN reading_log l ON l.meter_id = u.meter_id AND l.seq = u.seq
JOIN readings r ON r.meter_id = l.meter_id AND r.seq = l.seq AND r.ts = l.ts
"""


@dataclass(frozen=True, slots=True)
class Times:
    """One stored reading's clock, in ms since the epoch."""

    sent: float
    received: float
    verified: float
    stored: float
    receipt: float

    @property
    def total(self) -> float:
        return self.receipt - self.sent

    def legs(self) -> tuple[float, float, float, float]:
        return (
            self.received - self.sent,
            self.verified - self.received,
            self.stored - self.verified,
            self.receipt - self.stored,
        )


def join_stored(database_url: str, receipts: dict[str, list[Any]]) -> list[Times]:
    """The generators' receipts (`meter_id`, `seq`, `sent`, `receipt` lists, ms) joined
    with their stored rows; a receipt without a stored row (a duplicate, a rejection) is
    left out."""
    ids, seqs = receipts["meter_id"], receipts["seq"]
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(_STORED, (ids, seqs)).fetchall()
    sent, receipt = receipts["sent"], receipts["receipt"]
    return [
        Times(sent[i - 1], float(received), float(verified), float(stored), receipt[i - 1])
        for i, received, verified, stored in rows
    ]


def summarise(times: Sequence[Times]) -> dict[str, Any]:
    """Each leg's median and p99, and its mean over the readings at or above the p99 of
    the whole latency."""
    if not times:
        return {"count": 0}
    p99 = percentile([t.total for t in times], 99)
    slowest = [t.legs() for t in times if t.total >= p99]
    per_leg = list(zip(*(t.legs() for t in times), strict=True))
    return {
        "count": len(times),
        "slowest": len(slowest),
        "p99_ms": round(p99, 1),
        "legs": {
            name: {
                "p50": round(percentile(values, 50), 1),
                "p99": round(percentile(values, 99), 1),
                "slowest_mean": round(sum(s[k] for s in slowest) / len(slowest), 1),
            }
            for k, (name, values) in enumerate(zip(LEGS, per_leg, strict=True))
        },
    }


def slowest_legs(split: dict[str, Any]) -> str:
    """One line for a person: where the slowest 1% of a `summarise` spent their time."""
    spent = ", ".join(f"{k} {v['slowest_mean']:.1f}" for k, v in split["legs"].items())
    return f"the slowest 1% (>= {split['p99_ms']:.1f} ms) spent, ms: {spent}"
