"""Stored readings as the API serves them: latest, and history by time range with a
keyset cursor (ts, seq), so a page costs the same wherever it starts. The rows are
rebuilt into the verified reading of docs/spec/reading-v1.md section 13: the signed
fields, `reading_hash` and `verified_at`, so a reader can re-verify each one."""

from __future__ import annotations

import base64
import binascii
import csv
import io
from collections.abc import Sequence
from typing import Any, Final, LiteralString

import psycopg
from psycopg_pool import AsyncConnectionPool

from meterproof.api.errors import ApiError
from meterproof.errors import UnavailableError
from meterproof.schemas.reading import b64url

#: A wire millisecond as a timestamptz(3), exactly (no float division).
_MS: Final[LiteralString] = "('epoch'::timestamptz + %s * interval '1 millisecond')"
#: Columns in the order of the verified reading's fields.
FIELDS: Final = (
    "meter_id", "seq", "ts", "import_wh", "export_wh", "power_w", "voltage_mv", "current_ma",
    "frequency_mhz", "power_factor_milli", "alg", "kid", "sig", "reading_hash", "verified_at",
)  # fmt: skip
#: The readings whose keys `{keys}` selects from reading_log, in its (meter_id, ts, seq)
#: index order: `readings` has no index in ts order (its unique key leads with seq), so
#: each row is then fetched by that key from the partition its ts names.
_SELECT: Final[LiteralString] = (
    "SELECT r.meter_id, r.seq, (extract(epoch FROM r.ts) * 1000)::bigint, r.import_wh,"
    " r.export_wh, r.power_w, r.voltage_mv, r.current_ma, r.frequency_mhz,"
    " r.power_factor_milli, r.alg, r.kid, r.sig, r.reading_hash,"
    " (extract(epoch FROM r.verified_at) * 1000)::bigint"
    " FROM (SELECT meter_id, seq, ts FROM reading_log WHERE meter_id = %s {keys}) k"
    " JOIN LATERAL (SELECT * FROM readings x WHERE x.meter_id = k.meter_id AND x.seq = k.seq"
    " AND x.ts = k.ts) r ON true ORDER BY k.ts {order}, k.seq {order}"
)


def _reading(row: Sequence[Any]) -> dict[str, Any]:
    values = dict(zip(FIELDS, row, strict=True))
    values["seq"], values["import_wh"], values["export_wh"] = (
        int(values["seq"]), int(values["import_wh"]), int(values["export_wh"]),
    )  # fmt: skip
    values["sig"] = b64url(bytes(values["sig"]))
    values["reading_hash"] = bytes(values["reading_hash"]).hex()
    return {"v": 1, **{k: v for k, v in values.items() if v is not None}}


def encode_cursor(reading: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(f"{reading['ts']}:{reading['seq']}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[int, int]:
    try:
        ts, seq = base64.urlsafe_b64decode(cursor.encode()).decode().split(":")
        return int(ts), int(seq)
    except (binascii.Error, UnicodeError, ValueError):
        raise ApiError(400, "invalid_cursor", "use the next_cursor of a previous page") from None


async def latest(pool: AsyncConnectionPool, meter_id: str) -> dict[str, Any] | None:
    query = _SELECT.format(keys="ORDER BY ts DESC, seq DESC LIMIT 1", order="DESC")
    rows = await _query(pool, query, (meter_id,))
    return _reading(rows[0]) if rows else None


async def history(
    pool: AsyncConnectionPool,
    meter_id: str,
    *,
    from_ms: int,
    to_ms: int,
    after: tuple[int, int] | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Readings with from_ms <= ts < to_ms, after the cursor, in (ts, seq) order."""
    after_ts, after_seq = after if after is not None else (from_ms - 1, 0)
    keys = f"AND ts >= {_MS} AND ts < {_MS} AND (ts, seq) > ({_MS}, %s::numeric)"
    query = _SELECT.format(keys=keys + " ORDER BY ts, seq LIMIT %s", order="ASC")
    rows = await _query(pool, query, (meter_id, from_ms, to_ms, after_ts, after_seq, limit))
    return [_reading(r) for r in rows]


async def owner_of(pool: AsyncConnectionPool, reading_hash: bytes) -> tuple[str, int] | None:
    """(meter id, ts in unix ms) of a stored reading, for the consent policy."""
    rows = await _query(
        pool,
        "SELECT meter_id, (extract(epoch FROM ts) * 1000)::bigint FROM reading_log"
        " WHERE reading_hash = %s LIMIT 1",
        (reading_hash,),
    )
    return (str(rows[0][0]), int(rows[0][1])) if rows else None


async def meter_status(pool: AsyncConnectionPool, meter_id: str) -> str | None:
    rows = await _query(pool, "SELECT status::text FROM meters WHERE meter_id = %s", (meter_id,))
    return str(rows[0][0]) if rows else None


async def last_event_id(pool: AsyncConnectionPool, meter_id: str) -> int:
    """The newest security event of the meter (0: none); uses (meter_id, at)'s index."""
    rows = await _query(
        pool,
        "SELECT id FROM security_events WHERE meter_id = %s ORDER BY at DESC, id DESC LIMIT 1",
        (meter_id,),
    )
    return int(rows[0][0]) if rows else 0


async def events_after(
    pool: AsyncConnectionPool, meter_id: str, after_id: int, *, limit: int
) -> list[dict[str, Any]]:
    """The meter's security events recorded after `after_id`, oldest first."""
    rows = await _query(
        pool,
        "SELECT id, type, severity::text, detail, (extract(epoch FROM at) * 1000)::bigint"
        " FROM security_events WHERE meter_id = %s AND id > %s ORDER BY id LIMIT %s",
        (meter_id, after_id, limit),
    )
    return [
        {"id": int(r[0]), "type": r[1], "severity": r[2], "detail": r[3], "at_ms": int(r[4])}
        for r in rows
    ]


def as_csv(readings: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(readings)
    return out.getvalue()


async def _query(
    pool: AsyncConnectionPool, query: LiteralString, params: Sequence[Any]
) -> list[tuple[Any, ...]]:
    try:
        async with pool.connection() as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchall()
    except psycopg.Error as exc:
        raise UnavailableError("database", f"read: {exc}") from exc
