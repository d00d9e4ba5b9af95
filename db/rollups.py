"""Per-meter energy per 15 minutes, hour and UTC day, for billing and the API: read from
`meter_quarters`, which the database keeps up to date in the same transaction as each
stored batch (migrations 0005, 0007), so no query here ever scans raw readings. Hours and
days are sums of their quarters, made here: one upsert per quarter is what the batch
transaction pays, not three.

What a row means, exactly: a reading's register difference from its predecessor (in
(ts, seq) order; none for a meter's first reading) belongs to the interval that holds the
later reading's ts, and `readings` counts the readings whose ts is in the interval. So the
energy over any run of whole intervals [a, b) is the registers of the last reading before
b minus those of the last reading before a, whatever order the readings arrived in;
15-minute rows add up to their hour, hours to their day. docs/scaling.md says more.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final

import psycopg
from psycopg.rows import tuple_row


class Width(StrEnum):
    """The rollup intervals; the value is the `width` of the `meter_rollups` view (0007)."""

    QUARTER = "15m"
    HOUR = "1h"
    DAY = "1d"

    @property
    def ms(self) -> int:
        """The interval's length in milliseconds."""
        return _WIDTH_MS[self]


_WIDTH_MS: Final = {Width.QUARTER: 900_000, Width.HOUR: 3_600_000, Width.DAY: 86_400_000}


@dataclass(frozen=True, slots=True)
class Rollup:
    """One interval of one meter: [start, start + width), Wh imported and exported."""

    start: datetime
    import_wh: int
    export_wh: int
    readings: int


#: Quarters that start in [from, to), oldest first: one range of the primary key.
QUARTERS_SQL: Final = """
SELECT bucket, import_wh, export_wh, readings FROM meter_quarters
WHERE meter_id = %(meter)s AND bucket >= %(from)s AND bucket < %(to)s
ORDER BY bucket
"""
#: Hours or days that start in [from, to), oldest first, summed from one range of quarters:
#: from the first interval's start to the last one's end. A quarter lies wholly inside its
#: hour and UTC day, so the sums are exact.
SUMMED_SQL: Final = """
SELECT i.start, sum(q.import_wh), sum(q.export_wh), sum(q.readings)
FROM meter_quarters q
CROSS JOIN LATERAL (SELECT date_bin(%(step)s, q.bucket, timestamptz '2000-01-01 00:00:00+00')
                    AS start) i
WHERE q.meter_id = %(meter)s
  AND q.bucket >= date_bin(%(step)s, %(from)s, timestamptz '2000-01-01 00:00:00+00')
  AND q.bucket < date_bin(%(step)s, %(to)s, timestamptz '2000-01-01 00:00:00+00') + %(step)s
  AND i.start >= %(from)s AND i.start < %(to)s
GROUP BY i.start
ORDER BY i.start
"""
#: What the summed widths' intervals last.
STEPS: Final = {Width.HOUR: timedelta(hours=1), Width.DAY: timedelta(days=1)}


def rollups(
    conn: psycopg.Connection[Any],
    meter_id: str,
    width: Width | str,
    from_ts: datetime,
    to_ts: datetime,
) -> list[Rollup]:
    """The meter's rollups of `width` ("15m", "1h", "1d") starting in [from_ts, to_ts);
    intervals without readings have no row. Timestamps must be timezone-aware."""
    query, params = _query(meter_id, width, from_ts, to_ts)
    with conn.cursor(row_factory=tuple_row) as cur:
        return [_rollup(row) for row in cur.execute(query, params).fetchall()]


async def rollups_async(
    conn: psycopg.AsyncConnection[Any],
    meter_id: str,
    width: Width | str,
    from_ts: datetime,
    to_ts: datetime,
) -> list[Rollup]:
    """`rollups` on an async connection."""
    query, params = _query(meter_id, width, from_ts, to_ts)
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(query, params)
        return [_rollup(row) for row in await cur.fetchall()]


#: Each interval as (start in unix ms, its JSON object as the API's `RollupOut`): a month
#: of quarters is 2,880 rows, and Python values (datetime, Decimal) then a model per row
#: cost ~25 ms of it, PostgreSQL's rendering ~2.
_JSON_SQL: Final = """
SELECT (date_part('epoch', r.start) * 1000)::bigint,
       '{{"start_ms":' || (date_part('epoch', r.start) * 1000)::bigint || ',"import_wh":'
       || r.import_wh || ',"export_wh":' || r.export_wh || ',"readings":' || r.readings || '}}'
FROM ({query}) AS r (start, import_wh, export_wh, readings)
ORDER BY r.start
"""


async def rollups_json(
    conn: psycopg.AsyncConnection[Any],
    meter_id: str,
    width: Width | str,
    from_ts: datetime,
    to_ts: datetime,
) -> list[tuple[int, str]]:
    """`rollups` as (start in unix ms, the interval as a JSON object), oldest first."""
    query, params = _query(meter_id, width, from_ts, to_ts)
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(_JSON_SQL.format(query=query), params)
        return [(int(start), text) for start, text in await cur.fetchall()]


def _query(
    meter_id: str, width: Width | str, from_ts: datetime, to_ts: datetime
) -> tuple[str, dict[str, Any]]:
    """Quarters as stored; hours and days grouped (grouping quarters doubles their read)."""
    if from_ts.tzinfo is None or to_ts.tzinfo is None:
        raise ValueError("rollup bounds must be timezone-aware")
    params: dict[str, Any] = {"meter": meter_id, "from": from_ts, "to": to_ts}
    if (w := Width(width)) is Width.QUARTER:
        return QUARTERS_SQL, params
    return SUMMED_SQL, params | {"step": STEPS[w]}


def _rollup(row: tuple[Any, ...]) -> Rollup:
    start, imported, exported, readings = row
    return Rollup(start, int(imported), int(exported), int(readings))
