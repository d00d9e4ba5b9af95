"""Claiming and sealing in PostgreSQL: the bridge's half of exactly-once.

A batch is a row of `bridge_batches`; a reading belongs to it when its `reading_log.batch_id`
says so. Claiming is `UPDATE reading_log SET batch_id = B WHERE batch_id IS NULL AND ts <
end(epoch)`, which only ever sees committed rows and only takes unclaimed ones: a reading
whose transaction commits after a claim is simply taken by a later one, never skipped and
never taken twice, however slow either transaction is.

The bridge claims continuously while an epoch is open (a million-row UPDATE at the close
would take longer than the whole seal budget), into the one open batch, and the same
statement folds the claimed rows into per-meter aggregates. Sealing, once the epoch closed
and its grace delay passed, is one transaction: a final claim, the leaves in (ts, meter_id,
seq) order, the Merkle root, the mints from the aggregates and the per-meter mint state,
the signed entry, status 'pending'. Every transaction takes one advisory lock, so two
bridges on one database take turns instead of racing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from meterproof.bridge.entry import GENESIS, Entry, Header, seal
from meterproof.bridge.epochs import Epoch, next_epoch
from meterproof.bridge.ledger.sink import Receipt
from meterproof.bridge.mint import MeterBatch, MeterState, Mint, mint_batch
from meterproof.bridge.oracle import Oracle
from meterproof.db.silence import cut, deadline
from meterproof.schemas.merkle import merkle_root
from meterproof.schemas.timestamps import dt_to_ms, ms_to_dt

Conn = psycopg.Connection[Any]

#: Serialises bridges on one database (db.migrate uses ...184 and ...185).
_LOCK_KEY: Final = 7302166411205843186
_HEAD: Final = """
SELECT batch, epoch, epoch_ms, status, entry_hash FROM bridge_batches
ORDER BY batch DESC LIMIT 1
"""
_OLDEST_UNCLAIMED: Final = "SELECT min(ts) FROM reading_log WHERE batch_id IS NULL"
_OPEN: Final = "INSERT INTO bridge_batches (batch, epoch, epoch_ms) VALUES (%s, %s, %s)"
_CLAIM: Final = """
WITH claimed AS (
    UPDATE reading_log SET batch_id = %(batch)s
    WHERE batch_id IS NULL AND ts < %(end)s
    RETURNING meter_id, seq, ts, import_wh, export_wh
), firsts AS (
    SELECT DISTINCT ON (meter_id) meter_id, ts, seq, export_wh, import_wh
    FROM claimed ORDER BY meter_id, ts, seq
), tops AS (
    SELECT meter_id, count(*) AS n, max(export_wh) AS max_export_wh, max(import_wh) AS max_import_wh
    FROM claimed GROUP BY meter_id
), merged AS (
    INSERT INTO bridge_batch_meters AS b (batch, meter_id, readings, first_ts, first_seq,
        first_export_wh, first_import_wh, max_export_wh, max_import_wh)
    SELECT %(batch)s, f.meter_id, t.n, f.ts, f.seq, f.export_wh, f.import_wh,
           t.max_export_wh, t.max_import_wh
    FROM firsts f JOIN tops t USING (meter_id)
    ON CONFLICT (batch, meter_id) DO UPDATE SET
        readings = b.readings + EXCLUDED.readings,
        first_ts = CASE WHEN (EXCLUDED.first_ts, EXCLUDED.first_seq) < (b.first_ts, b.first_seq)
                        THEN EXCLUDED.first_ts ELSE b.first_ts END,
        first_seq = CASE WHEN (EXCLUDED.first_ts, EXCLUDED.first_seq) < (b.first_ts, b.first_seq)
                         THEN EXCLUDED.first_seq ELSE b.first_seq END,
        first_export_wh = CASE WHEN (EXCLUDED.first_ts, EXCLUDED.first_seq) < (b.first_ts, b.first_seq)
                               THEN EXCLUDED.first_export_wh ELSE b.first_export_wh END,
        first_import_wh = CASE WHEN (EXCLUDED.first_ts, EXCLUDED.first_seq) < (b.first_ts, b.first_seq)
                               THEN EXCLUDED.first_import_wh ELSE b.first_import_wh END,
        max_export_wh = GREATEST(b.max_export_wh, EXCLUDED.max_export_wh),
        max_import_wh = GREATEST(b.max_import_wh, EXCLUDED.max_import_wh)
    RETURNING 1
)
SELECT count(*) FROM claimed
"""  # noqa: E501
#: The leaf order of docs/spec/reading-v1.md section 14; "C" makes meter_id order bytewise
#: everywhere.
_LEAVES: Final = """
SELECT coalesce(string_agg(reading_hash, ''::bytea ORDER BY ts, meter_id COLLATE "C", seq),
                ''::bytea)
FROM reading_log WHERE batch_id = %s
"""
_AGGREGATES: Final = """
SELECT b.meter_id, b.readings, b.first_export_wh, b.first_import_wh,
       b.max_export_wh, b.max_import_wh, s.baseline_export_wh, s.baseline_import_wh,
       s.max_export_wh, s.max_import_wh, s.first_batch, s.last_batch, m.owner_wallet
FROM bridge_batch_meters b
LEFT JOIN bridge_mint_state s USING (meter_id)
LEFT JOIN meters m USING (meter_id)
WHERE b.batch = %s
"""
_SAVE_STATES: Final = """
INSERT INTO bridge_mint_state AS s (meter_id, baseline_export_wh, baseline_import_wh,
    max_export_wh, max_import_wh, first_batch, last_batch)
SELECT * FROM unnest(%s::text[], %s::numeric[], %s::numeric[], %s::numeric[], %s::numeric[],
                     %s::bigint[], %s::bigint[])
ON CONFLICT (meter_id) DO UPDATE SET
    max_export_wh = EXCLUDED.max_export_wh,
    max_import_wh = EXCLUDED.max_import_wh,
    last_batch = EXCLUDED.last_batch
"""
_SAVE_MINTS: Final = """
INSERT INTO bridge_mints (batch, meter_id, owner_wallet, export_delta_wh, import_delta_wh,
    grid_units)
SELECT %s, * FROM unnest(%s::text[], %s::text[], %s::numeric[], %s::numeric[], %s::numeric[])
"""
_SEALED: Final = """
UPDATE bridge_batches SET status = 'pending', sealed_at = now(), reading_count = %s,
    merkle_root = %s, header = %s, signature = %s, entry_hash = %s, minted_units = %s,
    idempotency_key = %s
WHERE batch = %s AND status = 'open'
"""
_FIRST_PENDING: Final = """
SELECT batch, header, signature, attempts FROM bridge_batches
WHERE status = 'pending' ORDER BY batch LIMIT 1
"""
_MINTS: Final = """
SELECT meter_id, owner_wallet, export_delta_wh, import_delta_wh FROM bridge_mints
WHERE batch = %s ORDER BY meter_id COLLATE "C"
"""


@dataclass(frozen=True, slots=True)
class Step:
    """What one `advance` did: readings claimed, entries sealed, and the open batch's epoch."""

    claimed: int
    sealed: list[Entry]
    open_epoch: Epoch | None


@dataclass(frozen=True, slots=True)
class Pending:
    batch: int
    entry: Entry
    attempts: int


@dataclass(frozen=True, slots=True)
class Anchored:
    entry: Entry
    receipt: Receipt
    sealed_at_ms: int
    anchored_at_ms: int


class BatchStore:
    """The bridge's tables over one autocommit connection; each call is one explicit
    transaction, so nothing is left open between passes. With `within_s`, a transaction
    the server leaves unanswered that long has its connection cut (`meterproof.db.silence`)
    and fails as on a lost one: a primary gone silent holds no pass."""

    def __init__(self, conn: Conn, *, within_s: float | None = None) -> None:
        self._conn = conn
        self._within_s = within_s

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        bound: contextlib.AbstractContextManager[object] = (
            contextlib.nullcontext()
            if self._within_s is None
            else deadline(within_s=self._within_s, cut_off=partial(cut, self._conn), wait="bridge")
        )
        with bound, self._conn.transaction():
            yield

    def advance(self, now_ms: int, *, epoch_ms: int, delay_ms: int, oracle: Oracle) -> Step:
        """Claim into the open batch (opening one when readings wait) and seal every batch
        whose epoch is due, oldest first; several after a long stop."""
        claimed = 0
        sealed: list[Entry] = []
        while True:
            with self._transaction(), self._conn.cursor(row_factory=tuple_row) as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                head = cur.execute(_HEAD).fetchone()
                if head is not None and head[3] == "open":
                    batch, epoch = int(head[0]), Epoch(int(head[1]), int(head[2]))
                else:
                    oldest = cur.execute(_OLDEST_UNCLAIMED).fetchone()
                    if oldest is None or oldest[0] is None:
                        return Step(claimed, sealed, None)
                    previous_end = (
                        None if head is None else Epoch(int(head[1]), int(head[2])).end_ms
                    )
                    epoch = next_epoch(
                        previous_end_ms=previous_end,
                        oldest_unclaimed_ms=dt_to_ms(oldest[0]),
                        length_ms=epoch_ms,
                    )
                    batch = 1 if head is None else int(head[0]) + 1
                    cur.execute(_OPEN, (batch, epoch.index, epoch.length_ms))
                claimed += self._claim(cur, batch, epoch)
                if not epoch.due(now_ms, delay_ms):
                    return Step(claimed, sealed, epoch)
                prev = GENESIS if batch == 1 else self._entry_hash(cur, batch - 1)
                sealed.append(self._seal(cur, batch, epoch, prev, oracle))

    def _claim(self, cur: psycopg.Cursor[tuple[Any, ...]], batch: int, epoch: Epoch) -> int:
        row = cur.execute(_CLAIM, {"batch": batch, "end": ms_to_dt(epoch.end_ms)}).fetchone()
        assert row is not None
        return int(row[0])

    @staticmethod
    def _entry_hash(cur: psycopg.Cursor[tuple[Any, ...]], batch: int) -> bytes:
        row = cur.execute(
            "SELECT entry_hash FROM bridge_batches WHERE batch = %s", (batch,)
        ).fetchone()
        assert row is not None
        assert row[0] is not None, f"batch {batch} is not sealed"
        return bytes(row[0])

    def _seal(
        self,
        cur: psycopg.Cursor[tuple[Any, ...]],
        batch: int,
        epoch: Epoch,
        prev: bytes,
        oracle: Oracle,
    ) -> Entry:
        cur.execute("SET LOCAL work_mem = '256MB'")  # sort a million leaves in memory
        row = cur.execute(_LEAVES, (batch,)).fetchone()
        assert row is not None
        blob = bytes(row[0])
        leaves = [blob[i : i + 32] for i in range(0, len(blob), 32)]
        aggregates: list[MeterBatch] = []
        states: dict[str, MeterState] = {}
        wallets: dict[str, str | None] = {}
        counted = 0
        for r in cur.execute(_AGGREGATES, (batch,)):
            meter_id = str(r[0])
            counted += int(r[1])
            aggregates.append(MeterBatch(meter_id, int(r[2]), int(r[3]), int(r[4]), int(r[5])))
            if r[6] is not None:
                states[meter_id] = MeterState(*(int(v) for v in r[6:12]))
            wallets[meter_id] = r[12]
        assert counted == len(leaves), f"batch {batch}: {counted} aggregated, {len(leaves)} leaves"
        mints, new_states = mint_batch(batch, aggregates, states, wallets)
        entry = seal(
            batch=batch,
            epoch=epoch.index,
            epoch_ms=epoch.length_ms,
            prev_hash=prev,
            merkle_root=merkle_root(leaves),
            reading_count=len(leaves),
            mints=mints,
            oracle=oracle.key,
            oracle_key=oracle.public_key,
        )
        self._save(cur, batch, mints, new_states)
        h = entry.header
        cur.execute(
            _SEALED,
            (
                h.reading_count,
                h.merkle_root,
                h.encode(),
                entry.signature,
                h.entry_hash,
                entry.minted_units,
                h.idempotency_key,
                batch,
            ),
        )
        cur.execute("DELETE FROM bridge_batch_meters WHERE batch = %s", (batch,))
        return entry

    @staticmethod
    def _save(
        cur: psycopg.Cursor[tuple[Any, ...]],
        batch: int,
        mints: list[Mint],
        states: dict[str, MeterState],
    ) -> None:
        if states:
            s = list(states.values())
            cur.execute(
                _SAVE_STATES,
                (
                    list(states),
                    [x.baseline_export_wh for x in s],
                    [x.baseline_import_wh for x in s],
                    [x.max_export_wh for x in s],
                    [x.max_import_wh for x in s],
                    [x.first_batch for x in s],
                    [x.last_batch for x in s],
                ),
            )
        if mints:
            cur.execute(
                _SAVE_MINTS,
                (
                    batch,
                    [m.meter_id for m in mints],
                    [m.wallet for m in mints],
                    [m.export_wh for m in mints],
                    [m.import_wh for m in mints],
                    [m.units for m in mints],
                ),
            )

    def first_pending(self) -> Pending | None:
        """The oldest sealed batch the sink has not acknowledged: the only one that may go."""
        with self._transaction(), self._conn.cursor(row_factory=tuple_row) as cur:
            row = cur.execute(_FIRST_PENDING).fetchone()
            if row is None:
                return None
            batch = int(row[0])
            return Pending(batch, self._entry(cur, batch, row[1], row[2]), int(row[3]))

    @staticmethod
    def _entry(
        cur: psycopg.Cursor[tuple[Any, ...]], batch: int, header: bytes, signature: bytes
    ) -> Entry:
        mints = tuple(
            Mint(str(m), w, int(e), int(i)) for m, w, e, i in cur.execute(_MINTS, (batch,))
        )
        return Entry(Header.decode(bytes(header)), bytes(signature), mints)

    def count_attempt(self, batch: int) -> None:
        """Committed before each submission: a batch with attempts may be in the sink."""
        with self._transaction():
            self._conn.execute(
                "UPDATE bridge_batches SET attempts = attempts + 1 WHERE batch = %s", (batch,)
            )

    def record_failure(self, batch: int, error: str) -> None:
        with self._transaction():
            self._conn.execute(
                "UPDATE bridge_batches SET last_error = %s WHERE batch = %s", (error, batch)
            )

    def mark_anchored(self, batch: int, receipt: Receipt) -> None:
        with self._transaction():
            self._conn.execute(
                "UPDATE bridge_batches SET status = 'anchored', anchored_at = now(),"
                " receipt = %s, last_error = NULL WHERE batch = %s AND status = 'pending'",
                (Jsonb(receipt.to_json()), batch),
            )

    def recently_anchored(self, limit: int) -> list[tuple[int, str]]:
        """(batch, idempotency key) of the newest `limit` anchored batches, oldest first."""
        with self._transaction(), self._conn.cursor(row_factory=tuple_row) as cur:
            rows = cur.execute(
                "SELECT batch, idempotency_key FROM bridge_batches WHERE status = 'anchored'"
                " ORDER BY batch DESC LIMIT %s",
                (limit,),
            ).fetchall()
        return [(int(b), str(k)) for b, k in reversed(rows)]

    def reopen(self, batch: int) -> int:
        """Back to pending from `batch` on (the sink lost them: a reorg drops a suffix of
        the chain); attempts are kept, so each is looked up before it is sent again."""
        with self._transaction():
            done = self._conn.execute(
                "UPDATE bridge_batches SET status = 'pending', receipt = NULL,"
                " anchored_at = NULL WHERE batch >= %s AND status = 'anchored'",
                (batch,),
            )
        return done.rowcount

    def pending_count(self) -> tuple[int, int]:
        """(pending batches, GRID units they will mint)."""
        with self._transaction(), self._conn.cursor(row_factory=tuple_row) as cur:
            row = cur.execute(
                "SELECT count(*), coalesce(sum(minted_units), 0) FROM bridge_batches"
                " WHERE status = 'pending'"
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def latest_anchored(self) -> Anchored | None:
        with self._transaction(), self._conn.cursor(row_factory=tuple_row) as cur:
            row = cur.execute(
                "SELECT batch, header, signature, receipt, sealed_at, anchored_at"
                " FROM bridge_batches WHERE status = 'anchored' ORDER BY batch DESC LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            entry = self._entry(cur, int(row[0]), row[1], row[2])
        return Anchored(entry, Receipt.from_json(row[3]), dt_to_ms(row[4]), dt_to_ms(row[5]))
