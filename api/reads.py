"""Stored readings as the API serves them: latest, and history by time range with a
keyset cursor (ts, seq), so a page costs the same wherever it starts. Each row is the
verified reading of docs/spec/reading-v1.md section 13 (the signed fields, `reading_hash`
and `verified_at`), so a reader can re-verify it.

PostgreSQL renders each reading as its JSON object (or CSV line) from readings' unique
(meter_id, ts, seq) index (migration 0010): a meter-day is 17,280 rows, and building
Python values and then JSON for each cost ~60 ms more than rendering them there
(docs/api.md, "Measured"). One step is left to Python, on the whole page at once:
`sig` leaves PostgreSQL as standard base64 (`encode`), and `finish` turns every '+', '/'
into base64url's '-', '_' and drops the line breaks and '=' padding with one
`bytes.translate`; per row in SQL that took longer than the rest of the row. No other
character of a JSON row can be one of those: numbers, hex, the meter id's alphabet, the
algorithm names, and `kid`, whose '+', '/' and '=' are written as JSON escapes."""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, LiteralString, TypeVar

import psycopg
import structlog
from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool

from meterproof.api.errors import ApiError
from meterproof.db.silence import bounded, cut, deadline
from meterproof.errors import UnavailableError

QUERIES = Counter(
    "meterproof_api_read_queries_total",
    "the API's read queries, by the server that answered",
    ["server"],
)
READS_AGAIN = Counter(
    "meterproof_api_reads_again_total",
    "reads tried again on another connection: the pool's was closed by its server",
)

log = structlog.get_logger("api.reads")
_T = TypeVar("_T")
#: A read tried again on another connection waits at most this long for one: a primary
#: that is up connects in milliseconds; one still away answers 503 now, not after the
#: pool's 30 s.
_AGAIN_WAIT_S: Final = 1.0

#: 9999-12-31T23:59:59.999Z: the latest time PostgreSQL's timestamptz holds with room.
MAX_MS: Final = 253_402_300_799_999
#: A reading's seq is a u64 (reading-v1).
MAX_SEQ: Final = 2**64 - 1
#: A wire millisecond as a timestamptz(3), exactly (no float division).
MS: Final[LiteralString] = "('epoch'::timestamptz + %s * interval '1 millisecond')"
#: Columns in the order of the verified reading's fields: the CSV header.
FIELDS: Final = (
    "meter_id", "seq", "ts", "import_wh", "export_wh", "power_w", "voltage_mv", "current_ma",
    "frequency_mhz", "power_factor_milli", "alg", "kid", "sig", "reading_hash", "verified_at",
)  # fmt: skip
#: unix ms of a timestamptz: exact for the whole milliseconds stored, and cheaper than
#: extract()'s numeric.
TS_MS: Final[LiteralString] = "(date_part('epoch', ts) * 1000)::bigint"
_VERIFIED_MS: Final[LiteralString] = "(date_part('epoch', verified_at) * 1000)::bigint"
#: Absent optional fields are left out, as on the wire. `||` with NULL is NULL.
JSON_ROW: Final[LiteralString] = (
    """'{"v":1,"meter_id":' || to_json(meter_id) || ',"seq":' || seq"""
    """ || ',"ts":' || """ + TS_MS + """ || ',"import_wh":' || import_wh"""
    """ || ',"export_wh":' || export_wh"""
    """ || coalesce(',"power_w":' || power_w, '')"""
    """ || coalesce(',"voltage_mv":' || voltage_mv, '')"""
    """ || coalesce(',"current_ma":' || current_ma, '')"""
    """ || coalesce(',"frequency_mhz":' || frequency_mhz, '')"""
    """ || coalesce(',"power_factor_milli":' || power_factor_milli, '')"""
    """ || ',"alg":' || to_json(alg) || coalesce(',"kid":' || replace(replace(replace("""
    """to_json(kid)::text, '/', '\\u002f'), '+', '\\u002b'), '=', '\\u003d'), '')"""
    """ || ',"sig":"' || encode(sig, 'base64') || '","reading_hash":"'"""
    """ || encode(reading_hash, 'hex') || '","verified_at":' || """ + _VERIFIED_MS + " || '}'"
)
#: A CSV line in FIELDS' order, quoted where csv's minimal quoting would: only `kid` can
#: hold a comma, quote or line break. Here `kid` may hold '+', '/' or '=', so `sig` is
#: made base64url in SQL.
CSV_ROW: Final[LiteralString] = (
    "concat_ws(',', meter_id, seq, " + TS_MS + ", import_wh, export_wh,"
    " coalesce(power_w::text, ''), coalesce(voltage_mv::text, ''),"
    " coalesce(current_ma::text, ''), coalesce(frequency_mhz::text, ''),"
    " coalesce(power_factor_milli::text, ''), alg,"
    """ CASE WHEN kid ~ '[",\r\n]' THEN '"' || replace(kid, '"', '""') || '"'"""
    " ELSE coalesce(kid, '') END,"
    " rtrim(replace(replace(replace(encode(sig, 'base64'), E'\\n', ''), '+', '-'), '/', '_'),"
    " '='), encode(reading_hash, 'hex'), " + _VERIFIED_MS + ")"
)
#: One meter's readings in (ts, seq) order, from one range of readings' unique index.
_SELECT: Final[LiteralString] = (
    "SELECT {ts} AS ts_ms, seq::text AS seq_text, {row} AS line FROM readings"
    " WHERE meter_id = %s {keys}"
)
_LATEST: Final[LiteralString] = _SELECT.format(
    ts=TS_MS, row=JSON_ROW, keys="ORDER BY ts DESC, seq DESC LIMIT 1"
)
_RANGE: Final[LiteralString] = (
    f"AND ts >= {MS} AND ts < {MS} AND (ts, seq) > ({MS}, %s::numeric) ORDER BY ts, seq LIMIT %s"
)
_HISTORY: Final = {"json": _SELECT.format(ts=TS_MS, row=JSON_ROW, keys=_RANGE),
                   "csv": _SELECT.format(ts=TS_MS, row=CSV_ROW, keys=_RANGE)}  # fmt: skip
_CSV_HEADER: Final = (",".join(FIELDS) + "\n").encode()
#: base64 -> unpadded base64url over a whole page (see the module).
_B64URL: Final = bytes.maketrans(b"+/", b"-_")


class ReadPool(AsyncConnectionPool):
    """The API's pools, whose reads a server gone silent (a primary's machine paused or cut
    off) cannot hold: a read still waiting after `answer_within_s` has its connection cut
    under it (`meterproof.db.silence`) and fails as on a closed one, so `read` tries it
    again on another; and the pool is drained, since every connection it holds may lead to
    the same silent server and each would wait that long again."""

    def __init__(
        self,
        conninfo: str,
        *,
        answer_within_s: float,
        **kwargs: Any,  # noqa: ANN401 - the pool's own options, passed on
    ) -> None:
        super().__init__(bounded(conninfo, answer_within_s), **kwargs)
        self.answer_within_s = answer_within_s

    async def _connect(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 - the signature it overrides
    ) -> psycopg.AsyncConnection[Any]:
        """The pool's connect, whose failure leaves no socket open, as `db.connect`'s:
        without its traceback the error no longer holds the failed attempt."""
        try:
            return await super()._connect(timeout)
        except psycopg.Error as exc:
            raise exc.with_traceback(None) from None

    @contextlib.asynccontextmanager
    async def answering(
        self, *, wait: str, wait_s: float | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection (waiting `wait_s` for one, default the pool's) whose work is cut
        after `answer_within_s`, the pool drained then; `wait` names it in the log."""
        async with self.connection(timeout=wait_s) as conn:
            with deadline(
                within_s=self.answer_within_s, cut_off=partial(cut, conn), wait=wait
            ) as d:
                try:
                    yield conn
                finally:
                    if d.fired:
                        await self.drain()


@dataclass(frozen=True, slots=True)
class Page:
    """Readings in (ts, seq) order: each one's time (unix ms), for the consent policy,
    and its rendering, which `finish` completes; `last` is the last one's (ts, seq), the
    cursor's position. Plain lists: an object per row cost ~30 ms of a meter-day."""

    times: list[int]
    lines: list[str]
    last: tuple[int, int] | None


def finish(lines: Sequence[str]) -> bytes:
    """JSON rows joined by commas, as bytes, with `sig` made base64url."""
    return ",".join(lines).encode().translate(_B64URL, b"\n=")


def csv_lines(lines: Sequence[str]) -> bytes:
    """CSV rows (complete already), newline-joined, as bytes."""
    return "\n".join(lines).encode()


def as_csv(rows: bytes) -> bytes:
    """Newline-joined CSV rows under the header line, each line ended."""
    return b"".join((_CSV_HEADER, rows, b"\n" if rows else b""))


def encode_cursor(last: tuple[int, int]) -> str:
    return base64.urlsafe_b64encode(f"{last[0]}:{last[1]}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[int, int]:
    """The (ts, seq) of a reading a `next_cursor` names; 400 `invalid_cursor` for anything
    else, numbers out of a reading's range included (the database would overflow on them)."""
    try:
        text_ts, text_seq = base64.urlsafe_b64decode(cursor.encode()).decode().split(":")
        ts, seq = int(text_ts), int(text_seq)
    except (binascii.Error, UnicodeError, ValueError):
        ts = seq = -1  # not two numbers: refused below, as numbers out of range are
    if not (0 <= ts <= MAX_MS and 0 <= seq <= MAX_SEQ):
        raise ApiError(400, "invalid_cursor", "use the next_cursor of a previous page")
    return ts, seq


async def latest(pool: ReadPool, meter_id: str) -> Page:
    """The meter's reading with the highest (ts, seq), rendered as JSON (or none)."""
    return await _page(pool, _LATEST, (meter_id,))


@dataclass(frozen=True, slots=True)
class Span:
    """What a history read asks for: one meter's readings with from_ms <= ts < to_ms
    after the cursor `after` (ts, seq), at most `limit` of them."""

    meter_id: str
    from_ms: int
    to_ms: int
    after: tuple[int, int] | None
    limit: int

    @property
    def after_key(self) -> tuple[int, int]:
        """The cursor's (ts, seq); without one, just before `from_ms`."""
        return self.after if self.after is not None else (self.from_ms - 1, 0)


async def history(pool: ReadPool, span: Span, *, csv: bool = False) -> Page:
    """The span's readings in (ts, seq) order, each rendered as JSON, or as a CSV line in
    FIELDS' order."""
    after_ts, after_seq = span.after_key
    sql = _HISTORY["csv" if csv else "json"]
    params = (span.meter_id, span.from_ms, span.to_ms, after_ts, after_seq, span.limit)
    return await _page(pool, sql, params)


async def owner_of(pool: ReadPool, reading_hash: bytes) -> tuple[str, int] | None:
    """(meter id, ts in unix ms) of a stored reading, for the consent policy."""
    rows = await query(
        pool,
        "SELECT meter_id, (extract(epoch FROM ts) * 1000)::bigint FROM reading_log"
        " WHERE reading_hash = %s LIMIT 1",
        (reading_hash,),
    )
    return (str(rows[0][0]), int(rows[0][1])) if rows else None


async def meter_status(pool: ReadPool, meter_id: str) -> str | None:
    rows = await query(pool, "SELECT status::text FROM meters WHERE meter_id = %s", (meter_id,))
    return str(rows[0][0]) if rows else None


async def last_event_id(pool: ReadPool, meter_id: str) -> int:
    """The newest security event of the meter (0: none); uses (meter_id, at)'s index."""
    rows = await query(
        pool,
        "SELECT id FROM security_events WHERE meter_id = %s ORDER BY at DESC, id DESC LIMIT 1",
        (meter_id,),
    )
    return int(rows[0][0]) if rows else 0


async def events_after(
    pool: ReadPool, meter_id: str, after_id: int, *, limit: int
) -> list[dict[str, Any]]:
    """The meter's security events recorded after `after_id`, oldest first."""
    rows = await query(
        pool,
        "SELECT id, type, severity::text, detail, (extract(epoch FROM at) * 1000)::bigint"
        " FROM security_events WHERE meter_id = %s AND id > %s ORDER BY id LIMIT %s",
        (meter_id, after_id, limit),
    )
    return [
        {"id": int(r[0]), "type": r[1], "severity": r[2], "detail": r[3], "at_ms": int(r[4])}
        for r in rows
    ]


@contextlib.asynccontextmanager
async def connection(
    pool: ReadPool, *, wait_s: float | None = None
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection of `pool` for one read (waiting `wait_s`, default the pool's timeout),
    counted by the server that answers it (a standby reached through `database_read_url`,
    or a primary); a database failure is UnavailableError (503)."""
    try:
        async with pool.answering(wait="api_read", wait_s=wait_s) as conn:
            standby = conn.info.parameter_status("in_hot_standby") == "on"  # PostgreSQL 14+
            QUERIES.labels(server="standby" if standby else "primary").inc()
            yield conn
    except psycopg.Error as exc:
        raise UnavailableError("database", f"read: {exc}") from exc


class _ClosedError(Exception):
    """The pooled connection a read took had been closed by its server."""


async def read(pool: ReadPool, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]]) -> _T:
    """`work` (reads only) on a connection of `pool`, again on another while the one taken
    turns out closed by its server. After a failover the pool still holds connections to
    the old primary, each of which would fail one request or stream poll; checking every
    connection as it is taken would cost a round trip on every read instead. At most the
    pool's size of them can be stale; a read tried again waits `_AGAIN_WAIT_S` at most for
    a connection, so while no primary answers it fails (503) at once, as before."""
    wait_s: float | None = None
    for _ in range(pool.max_size):
        try:
            return await _on_connection(pool, work, wait_s)
        except _ClosedError as gone:
            READS_AGAIN.inc()
            log.warning("read_again", reason="connection_closed", error=str(gone.__cause__))
            wait_s = _AGAIN_WAIT_S
    try:
        return await _on_connection(pool, work, wait_s)
    except _ClosedError as gone:
        raise UnavailableError("database", f"read: {gone.__cause__}") from gone


async def _on_connection(
    pool: ReadPool,
    work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]],
    wait_s: float | None,
) -> _T:
    async with connection(pool, wait_s=wait_s) as conn:
        try:
            return await work(conn)
        except psycopg.OperationalError as exc:
            if conn.broken:
                raise _ClosedError from exc
            raise


async def query(
    pool: ReadPool,
    sql: LiteralString,
    params: Sequence[Any] | Mapping[str, Any],
    *,
    binary: bool = False,
) -> list[tuple[Any, ...]]:
    """All rows of one read (`binary`: bytea as bytes, without hex)."""

    async def rows(conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
        cur = await conn.cursor(binary=binary).execute(sql, params)
        return await cur.fetchall()

    return await read(pool, rows)


async def _page(pool: ReadPool, sql: LiteralString, params: Sequence[Any]) -> Page:
    rows = await query(pool, sql, params)
    last = (int(rows[-1][0]), int(rows[-1][1])) if rows else None
    return Page([r[0] for r in rows], [r[2] for r in rows], last)
