"""The embedded `local` sink: a hash-chained, append-only ledger in PostgreSQL.

It behaves like a remote ledger on purpose: its own connection and transactions, so the
bridge gets no help from sharing a database. Every statement runs under `lock_timeout` and
`statement_timeout`: a ledger that cannot answer in time is "unavailable"; a server gone
silent, which answers nothing, not even those timeouts, has the connection cut after twice
the time (`meterproof.db.silence`) with the same outcome. One append is
one transaction that takes the appender lock, deduplicates on the idempotency key, checks
that the entry extends the head (batch = head + 1, prev_hash = head's entry hash), that the
trusted oracle key signed it and that its mint list matches the header, then writes the
entry, its mints and the new wallet balances. Triggers refuse UPDATE, DELETE and TRUNCATE
on entries and mints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import psycopg
from psycopg import errors
from psycopg.rows import tuple_row

from meterproof.bridge.entry import GENESIS, Entry, Header
from meterproof.bridge.faults import crash_point
from meterproof.bridge.ledger.sink import Receipt, SinkRejectedError, SinkUnavailableError
from meterproof.bridge.mint import Mint
from meterproof.db.connect import connect_sync
from meterproof.db.silence import cut, deadline
from meterproof.schemas.timestamps import dt_to_ms

_NAME: Final = "local"
#: A transaction still unanswered after this many of its statements' timeouts is on a
#: server that answers nothing: the server's own timeouts come first while it is there.
_SILENT_AFTER_TIMEOUTS: Final = 2
_BY_KEY: Final = (
    "SELECT seq, entry_hash, recorded_at FROM ledger_entries WHERE idempotency_key = %s"
)
_HEAD: Final = "SELECT seq, entry_hash FROM ledger_entries ORDER BY seq DESC LIMIT 1"
_APPEND: Final = """
INSERT INTO ledger_entries (seq, idempotency_key, epoch, epoch_ms, prev_hash, merkle_root,
    reading_count, mint_hash, oracle_key, header, signature, entry_hash, minted_units)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
RETURNING recorded_at
"""
_MINTS: Final = """
INSERT INTO ledger_mints (entry, meter_id, wallet, export_delta_wh, import_delta_wh, grid_units)
SELECT %s, * FROM unnest(%s::text[], %s::text[], %s::numeric[], %s::numeric[], %s::numeric[])
"""
_BALANCES: Final = """
INSERT INTO ledger_balances AS b (wallet, grid_units, last_entry)
SELECT wallet, sum(grid_units), %s FROM ledger_mints
WHERE entry = %s AND wallet IS NOT NULL AND grid_units > 0
GROUP BY wallet
ON CONFLICT (wallet) DO UPDATE SET
    grid_units = b.grid_units + EXCLUDED.grid_units, last_entry = EXCLUDED.last_entry
"""


class LocalSink:
    """Appends to the ledger tables of `database_url`; reconnects after any failure."""

    def __init__(self, database_url: str, *, trusted_key: bytes, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._url = database_url
        self._trusted_key = trusted_key
        self._timeout_ms = round(timeout_s * 1000)
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def name(self) -> str:
        return _NAME

    def submit(self, entry: Entry, idempotency_key: str) -> Receipt:
        h = entry.header
        if idempotency_key != h.idempotency_key:
            raise SinkRejectedError(
                "invalid_entry", f"key {idempotency_key} does not name the entry"
            )
        try:
            conn = self._connection()
            with self._bounded(conn), conn.cursor(row_factory=tuple_row) as cur:
                cur.execute("LOCK TABLE ledger_entries IN SHARE ROW EXCLUSIVE MODE")
                existing = cur.execute(_BY_KEY, (idempotency_key,)).fetchone()
                if existing is not None:
                    if bytes(existing[1]) != h.entry_hash:
                        raise SinkRejectedError(
                            "conflict", f"key {idempotency_key} holds another entry"
                        )
                    return self._receipt(existing)
                self._check_extends(cur.execute(_HEAD).fetchone(), entry)
                recorded = cur.execute(
                    _APPEND,
                    (
                        h.batch,
                        idempotency_key,
                        h.epoch,
                        h.epoch_ms,
                        h.prev_hash,
                        h.merkle_root,
                        h.reading_count,
                        h.mint_hash,
                        h.oracle_key,
                        h.encode(),
                        entry.signature,
                        h.entry_hash,
                        entry.minted_units,
                    ),
                ).fetchone()
                assert recorded is not None
                m = entry.mints
                cur.execute(
                    _MINTS,
                    (
                        h.batch,
                        [x.meter_id for x in m],
                        [x.wallet for x in m],
                        [x.export_wh for x in m],
                        [x.import_wh for x in m],
                        [x.units for x in m],
                    ),
                )
                cur.execute(_BALANCES, (h.batch, h.batch))
                crash_point("during_submit")
        except psycopg.Error as exc:
            self._drop()
            raise SinkUnavailableError(_describe(exc)) from exc
        return self._receipt((h.batch, h.entry_hash, recorded[0]))

    def _check_extends(self, head: tuple[Any, ...] | None, entry: Entry) -> None:
        h = entry.header
        head_seq, head_hash = (0, GENESIS) if head is None else (int(head[0]), bytes(head[1]))
        if h.batch != head_seq + 1 or h.prev_hash != head_hash:
            raise SinkRejectedError(
                "out_of_order",
                f"entry {h.batch} (prev {h.prev_hash.hex()[:16]}) does not extend head"
                f" {head_seq} ({head_hash.hex()[:16]})",
            )
        if h.oracle_key != self._trusted_key:
            raise SinkRejectedError(
                "invalid_entry", f"oracle key {h.oracle_key.hex()} is not trusted"
            )
        problem = entry.problem()
        if problem is not None:
            raise SinkRejectedError("invalid_entry", problem)

    def fetch(self, idempotency_key: str) -> Receipt | None:
        try:
            conn = self._connection()
            with self._bounded(conn), conn.cursor(row_factory=tuple_row) as cur:
                row = cur.execute(_BY_KEY, (idempotency_key,)).fetchone()
        except psycopg.Error as exc:
            self._drop()
            raise SinkUnavailableError(_describe(exc)) from exc
        return None if row is None else self._receipt(row)

    def close(self) -> None:
        self._drop()

    @contextlib.contextmanager
    def _bounded(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        """One transaction, cut if the server stays silent past its own timeouts."""
        within_s = _SILENT_AFTER_TIMEOUTS * self._timeout_ms / 1000
        with (
            deadline(within_s=within_s, cut_off=partial(cut, conn), wait="ledger"),
            conn.transaction(),
        ):
            yield

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            timeout = f"{self._timeout_ms}ms"
            self._conn = connect_sync(
                self._url,
                autocommit=True,
                connect_timeout=max(1, round(self._timeout_ms / 1000)),
                options=f"-c lock_timeout={timeout} -c statement_timeout={timeout}",
            )
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @staticmethod
    def _receipt(row: tuple[Any, ...]) -> Receipt:
        seq = int(row[0])
        return Receipt(
            sink=_NAME,
            position=seq,
            entry_hash=bytes(row[1]),
            reference=f"ledger_entries/{seq}",
            recorded_at_ms=dt_to_ms(row[2]),
        )


def _describe(exc: psycopg.Error) -> str:
    if isinstance(exc, errors.LockNotAvailable | errors.QueryCanceled):
        return "timed out waiting for the ledger"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"


@dataclass(frozen=True, slots=True)
class Recorded:
    entry: Entry
    recorded_at_ms: int


@dataclass(frozen=True, slots=True)
class Balance:
    wallet: str | None  #: None: GRID minted for meters that have no owner wallet
    grid_units: int
    last_entry: int


def recent_entries(conn: psycopg.Connection[Any], *, limit: int) -> list[Recorded]:
    """The newest `limit` entries of the local ledger with their mint lists, oldest first."""
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            "SELECT seq, header, signature, recorded_at FROM ledger_entries"
            " ORDER BY seq DESC LIMIT %s",
            (limit,),
        ).fetchall()
        if not rows:
            return []
        mints: dict[int, list[Mint]] = {int(r[0]): [] for r in rows}
        for entry, meter_id, wallet, exp, imp in cur.execute(
            "SELECT entry, meter_id, wallet, export_delta_wh, import_delta_wh FROM ledger_mints"
            ' WHERE entry = ANY(%s) ORDER BY entry, meter_id COLLATE "C"',
            (list(mints),),
        ):
            mints[int(entry)].append(Mint(str(meter_id), wallet, int(exp), int(imp)))
    return [
        Recorded(
            Entry(Header.decode(bytes(header)), bytes(signature), tuple(mints[int(seq)])),
            dt_to_ms(recorded_at),
        )
        for seq, header, signature, recorded_at in reversed(rows)
    ]


def balances(conn: psycopg.Connection[Any]) -> list[Balance]:
    """Per wallet, largest first; then the total minted to meters without a wallet."""
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            "SELECT wallet, grid_units, last_entry FROM ledger_balances"
            " ORDER BY grid_units DESC, wallet"
        ).fetchall()
        unowned = cur.execute(
            "SELECT sum(grid_units), max(entry) FROM ledger_mints"
            " WHERE wallet IS NULL AND grid_units > 0"
        ).fetchone()
    found = [Balance(str(w), int(u), int(e)) for w, u, e in rows]
    if unowned is not None and unowned[0] is not None:
        found.append(Balance(None, int(unowned[0]), int(unowned[1])))
    return found
