"""Per-meter energy per 15 minutes, hour and UTC day, for billing and the API: read from
`meter_rollups`, which the database keeps up to date in the same transaction as each
stored batch (migration 0005), so no query here ever scans raw readings.

What a row means, exactly: a reading's register difference from its predecessor (in
(ts, seq) order; none for a meter's first reading) belongs to the interval that holds the
later reading's ts, and `readings` counts the readings whose ts is in the interval. So the
energy over any run of whole intervals [a, b) is the registers of the last reading before
b minus those of the last reading before a, whatever order the readings arrived in;
15-minute rows add up to their hour, hours to their day. docs/scaling.md says more.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

import psycopg
from psycopg.rows import tuple_row


class Width(StrEnum):
    """The rollup intervals; the value is what `meter_rollups.width` holds."""

    QUARTER = "15m"
    HOUR = "1h"
    DAY = "1d"


@dataclass(frozen=True, slots=True)
class Rollup:
    """One interval of one meter: [start, start + width), Wh imported and exported."""

    start: datetime
    import_wh: int
    export_wh: int
    readings: int


#: Intervals that start in [from, to), oldest first; one index range of the primary key.
ROLLUPS_SQL: Final = """
SELECT bucket, import_wh, export_wh, readings FROM meter_rollups
WHERE meter_id = %s AND width = %s AND bucket >= %s AND bucket < %s
ORDER BY bucket
"""


def rollups(
    conn: psycopg.Connection[Any],
    meter_id: str,
    width: Width | str,
    from_ts: datetime,
    to_ts: datetime,
) -> list[Rollup]:
    """The meter's rollups of `width` ("15m", "1h", "1d") starting in [from_ts, to_ts);
    intervals without readings have no row. Timestamps must be timezone-aware."""
    params = _params(meter_id, width, from_ts, to_ts)
    with conn.cursor(row_factory=tuple_row) as cur:
        return [_rollup(row) for row in cur.execute(ROLLUPS_SQL, params).fetchall()]


async def rollups_async(
    conn: psycopg.AsyncConnection[Any],
    meter_id: str,
    width: Width | str,
    from_ts: datetime,
    to_ts: datetime,
) -> list[Rollup]:
    """`rollups` on an async connection."""
    params = _params(meter_id, width, from_ts, to_ts)
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(ROLLUPS_SQL, params)
        return [_rollup(row) for row in await cur.fetchall()]


def _params(
    meter_id: str, width: Width | str, from_ts: datetime, to_ts: datetime
) -> tuple[str, str, datetime, datetime]:
    if from_ts.tzinfo is None or to_ts.tzinfo is None:
        raise ValueError("rollup bounds must be timezone-aware")
    return meter_id, Width(width).value, from_ts, to_ts


def _rollup(row: tuple[Any, ...]) -> Rollup:
    start, imported, exported, readings = row
    return Rollup(start, int(imported), int(exported), int(readings))
