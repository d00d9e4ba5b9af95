"""The store stage: one transaction per batch, and the only place rules 7-9 meet the database.

Order inside the transaction, which is the design:
  1. lock the batch's meters (`FOR UPDATE`, sorted: no deadlock between workers), so two
     workers never judge the same meter's readings against a stale view, and read their
     status again: rule 3 was decided from the worker's cached snapshot, and a meter
     quarantined or decommissioned since (by another worker, by an operator) must not
     have a reading stored, acknowledged and receipted accepted after that commit;
  2. read what is stored around each candidate (`ingest.judge.StoredContext`): the hash
     under its (meter_id, seq), its nearest neighbours in (ts, seq) order, its rate
     window's count, and for a candidate that arrived before stored or batch readings
     close after it, how many are stored less than a window after it; their ts values
     (a second statement) only where the readings near it could fill a window;
  3. judge (pure, `ingest.judge`);
  4. write accepted readings (`reading_log` + `readings`, one statement), rejected readings
     and security events; quarantine meters over the failure threshold;
  5. commit. Only after that does the worker acknowledge anything.
`reading_log`'s primary key (meter_id, seq) stays the final judge of "seen": if it ever
fires, the transaction rolls back and the batch is judged again (by the guard's second
transaction, below).

A batch without rejections is two round trips: BEGIN, the lock and the contexts in one
pipeline; the rows and COMMIT in the next. Each round trip more cost the worker and
PostgreSQL CPU whatever the batch's size, and under live load most batches hold a few
readings (docs/scaling.md, "Two round trips a transaction"). So the store's connection
runs in autocommit mode and the store writes BEGIN and COMMIT itself; called inside a
caller's transaction (the API's `ProviderStore`), it writes on a savepoint of it instead.

The poison-batch guard: an error a retry cannot fix (a constraint, a value the database
refuses; `refused` says which by SQLSTATE) would otherwise come back on every retry of the
batch and hold up every reading in it for ever. So the batch is written again in one
transaction, bisected on savepoints until the refused readings stand alone; each is
parked in `rejected_readings` as `store_refused` (with its raw bytes and the database's
message) and the rest commits. Anything else (a lost connection, a shutdown, a deadlock)
stays `UnavailableError`: retried by the worker, nothing acknowledged meanwhile.

A COMMIT whose answer is lost with its connection (the network, a failover) may have
committed. The worker retries the batch on a new connection, where it must not be judged
again: its own readings would be `duplicate`, its rejections written twice. So the store
looks for one row the batch wrote first (`CommitInDoubt`), on that retry only. A caller
that sends the COMMIT itself (the API's `ProviderStore`) does the same through `landed`
and `commit_lost`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import chain
from typing import Final

import psycopg
import structlog
from psycopg import Connection, Pipeline, sql
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from meterproof.db.silence import cut
from meterproof.errors import UnavailableError, first_line
from meterproof.ingest.judge import (
    RateLimit,
    StoredContext,
    StoredPoint,
    batch_near,
    judge,
    needs_around,
    overtaken,
)
from meterproof.ingest.records import Accepted, Candidate, Message, Outcome, Rejection
from meterproof.ingest.security import QuarantinePolicy, event_for
from meterproof.registry.model import ACCEPTING
from meterproof.schemas.reading import RejectReason, b64url_decode
from meterproof.schemas.timestamps import ms_to_dt

log = structlog.get_logger("ingest.store")

#: The store's connection plans each statement once and keeps the plan. psycopg prepares a
#: statement after five runs; a custom plan for every batch cost PostgreSQL 0.47 ms (the
#: context query) and 0.18 ms (the lock) of planning per transaction, which at low rates
#: is most of a batch of one or two readings (measured: `pg_stat_statements`,
#: track_planning). A kept plan must not depend on how large the tables were when it was
#: made: planned while `reading_log` was nearly empty, a plain join hashed a scan of the
#: whole table and cost more with every row stored; planned with a few hundred meters, the
#: lock scanned `meters` for each id. So both queries probe each table per candidate
#: through a lateral subquery, and `enable_seqscan=off` makes every probe an index scan.
#: JIT is off: compiling a plan over a large table cost more than running it (batches of
#: 307-494 ms at about a million rows).
STORE_OPTIONS: Final = "-c plan_cache_mode=force_generic_plan -c enable_seqscan=off -c jit=off"


#: SQLSTATE classes of errors that the same rows would meet again on any retry: data
#: exceptions (22: a value out of range, a NUL in text), integrity constraints (23: CHECK,
#: NOT NULL, foreign key), program limits (54: a row too large for an index) and errors a
#: trigger raises (P0). Everything else is retried: a lost connection or shutdown (08, 57),
#: resources (53), a deadlock or serialization failure (40), and also 42 (an undefined
#: table or column, a privilege): that is the deployment's fault, not a reading's, and
#: bisecting it would park every reading of every batch until the schema is fixed.
_REFUSED_CLASSES: Final = frozenset({"22", "23", "54", "P0"})


def refused(exc: psycopg.Error) -> bool:
    """True when the database refused the rows themselves, so a retry cannot succeed."""
    return exc.sqlstate is not None and exc.sqlstate[:2] in _REFUSED_CLASSES


@dataclass(frozen=True, slots=True)
class BatchResult:
    outcomes: list[Outcome]
    quarantined: list[str]


#: A probe per id, not `meter_id = ANY(...)`: the planner turns that into a scan of every
#: meter compared with every id of the batch (measured: 41 ms for 300 of 2,000 meters). The
#: ids come sorted, and the nested loop locks in their order, so two workers never wait
#: for each other in a circle. It returns only the meters whose readings rule 3 now refuses
#: (a status that does not accept them, or no row): none, in the common case. A row locked
#: after waiting is read as the holder committed it.
_LOCK: Final = (
    sql.SQL("""
SELECT u.meter_id, m.status::text FROM unnest(%s::text::text[]) AS u(meter_id)
LEFT JOIN LATERAL (
    SELECT m.status FROM meters m WHERE m.meter_id = u.meter_id FOR UPDATE) m ON true
WHERE m.status IS NULL OR m.status NOT IN ({accepting})
""")
    .format(accepting=sql.SQL(", ").join(sql.Literal(s.value) for s in sorted(ACCEPTING)))
    .as_string(None)
)
#: One row per candidate, in order: what `ingest.judge.StoredContext` holds. Timestamps
#: travel as unix ms both ways (exact: readings carry whole ms), never as datetimes.
#: Retention (db/retention.py) leaves a watermark per meter for what it removed from
#: reading_log: a seq at or below its highest retired seq was stored (an empty hash,
#: which no candidate has, so rule 7 says seq_reused), and its latest retired reading in
#: (ts, seq) order is the neighbour before any candidate later than it. The neighbours
#: are row comparisons on (ts, seq), one descent of reading_log's (meter_id, ts, seq)
#: index each. The last column (`StoredContext.ahead`) is a count under CASE, run only
#: for a candidate with a stored reading less than a window after it or one of the
#: batch's (`overtaken`; NULL for the whole batch in the common case). A seq travels as
#: text: loaded as an int from it in a third of the time a numeric takes (~0.2 against
#: ~0.5 us, psycopg's C loaders), once for nearly every reading.
_CONTEXT = """
WITH c AS (
    SELECT u.meter_id, u.seq, u.ts_ms, u.overtaken, u.i,
        timestamptz 'epoch' + u.ts_ms * interval '1 millisecond' AS ts
    FROM unnest(%(meters)s::text::text[], %(seqs)s::text::numeric[], %(ts)s::text::int8[],
        %(overtaken)s::text::bool[])
        WITH ORDINALITY AS u(meter_id, seq, ts_ms, overtaken, i)
)
SELECT coalesce(l.reading_hash, CASE WHEN c.seq <= h.max_seq THEN ''::bytea END),
    (SELECT count(*) FROM (
        SELECT FROM reading_log r
        WHERE r.meter_id = c.meter_id AND r.ts > c.ts - %(window)s * interval '1 millisecond'
          AND r.ts <= c.ts
        LIMIT %(max)s) w),
    b.ts_ms, b.import_wh, b.export_wh, b.seq::text, a.ts_ms, a.import_wh, a.export_wh, a.seq::text,
    CASE WHEN c.overtaken OR a.ts_ms < c.ts_ms + %(window)s THEN (SELECT count(*) FROM (
        SELECT FROM reading_log r
        WHERE r.meter_id = c.meter_id
          AND r.ts > c.ts AND r.ts < c.ts + %(window)s * interval '1 millisecond'
        LIMIT %(max)s) w) END
FROM c
LEFT JOIN LATERAL (
    SELECT l.reading_hash FROM reading_log l WHERE l.meter_id = c.meter_id AND l.seq = c.seq
    LIMIT 1) l ON true
LEFT JOIN LATERAL (
    SELECT h.max_seq, h.ts, h.seq, h.import_wh, h.export_wh FROM reading_watermarks h
    WHERE h.meter_id = c.meter_id LIMIT 1) h ON true
LEFT JOIN LATERAL (
    SELECT (extract(epoch FROM x.ts) * 1000)::int8 AS ts_ms, x.seq, x.import_wh, x.export_wh
    FROM (
        (SELECT r.ts, r.seq, r.import_wh, r.export_wh FROM reading_log r
         WHERE r.meter_id = c.meter_id AND (r.ts, r.seq) < (c.ts, c.seq)
         ORDER BY r.ts DESC, r.seq DESC LIMIT 1)
        UNION ALL
        SELECT h.ts, h.seq, h.import_wh, h.export_wh WHERE (h.ts, h.seq) < (c.ts, c.seq)
    ) x ORDER BY x.ts DESC, x.seq DESC LIMIT 1) b ON true
LEFT JOIN LATERAL (
    SELECT (extract(epoch FROM r.ts) * 1000)::int8 AS ts_ms, r.seq, r.import_wh, r.export_wh
    FROM reading_log r WHERE r.meter_id = c.meter_id AND (r.ts, r.seq) > (c.ts, c.seq)
    ORDER BY r.ts, r.seq LIMIT 1) a ON true
ORDER BY c.i
"""
#: `StoredContext.around` of the candidates that need it (`ingest.judge.needs_around`): a
#: second statement, for readings that arrive before stored ones of a meter dense enough
#: to fill a window; none in the common case.
_AROUND = """
SELECT ARRAY(
    SELECT (extract(epoch FROM w.ts) * 1000)::int8 FROM (
        (SELECT r.ts FROM reading_log r
         WHERE r.meter_id = c.meter_id
           AND r.ts > c.ts - %(window)s * interval '1 millisecond' AND r.ts <= c.ts
         ORDER BY r.ts DESC LIMIT %(max)s)
        UNION ALL
        (SELECT r.ts FROM reading_log r
         WHERE r.meter_id = c.meter_id
           AND r.ts > c.ts AND r.ts < c.ts + %(window)s * interval '1 millisecond'
         ORDER BY r.ts LIMIT %(max)s)
    ) w ORDER BY w.ts)
FROM unnest(%(meters)s::text::text[], %(ts)s::text::int8[]) WITH ORDINALITY AS u(meter_id, ts_ms, i)
CROSS JOIN LATERAL (
    SELECT u.meter_id, timestamptz 'epoch' + u.ts_ms * interval '1 millisecond' AS ts) c
ORDER BY u.i
"""
#: Both tables in one statement (a data-modifying CTE runs exactly once, to completion),
#: from one array per column; timestamps travel as unix ms, as in `_CONTEXT`. One INSERT
#: cost less than the two COPYs it replaced at every batch size measured, 1 to 1,000
#: readings, and unlike COPY it can travel in a pipeline.
_INSERT_ACCEPTED = """
WITH r AS (
    SELECT * FROM unnest(
        %(meter_id)s::text::text[], %(seq)s::text::numeric[], %(hash)s::text::bytea[],
        %(ts)s::text::int8[], %(import)s::text::numeric[], %(export)s::text::numeric[],
        %(power)s::text::int8[], %(voltage)s::text::int8[], %(current)s::text::int8[],
        %(frequency)s::text::int8[], %(power_factor)s::text::int8[], %(alg)s::text::text[],
        %(kid)s::text::text[], %(sig)s::text::bytea[], %(received)s::text::int8[],
        %(verified)s::text::int8[])
    AS u(meter_id, seq, reading_hash, ts_ms, import_wh, export_wh, power_w, voltage_mv,
        current_ma, frequency_mhz, power_factor_milli, alg, kid, sig, received_ms, verified_ms)
), log AS (
    INSERT INTO reading_log (meter_id, seq, reading_hash, ts, import_wh, export_wh)
    SELECT meter_id, seq, reading_hash, timestamptz 'epoch' + ts_ms * interval '1 millisecond',
        import_wh, export_wh
    FROM r
)
INSERT INTO readings (meter_id, seq, ts, import_wh, export_wh, power_w, voltage_mv,
    current_ma, frequency_mhz, power_factor_milli, alg, kid, sig, reading_hash, received_at,
    verified_at)
SELECT meter_id, seq, timestamptz 'epoch' + ts_ms * interval '1 millisecond', import_wh,
    export_wh, power_w, voltage_mv, current_ma, frequency_mhz, power_factor_milli, alg, kid,
    sig, reading_hash, timestamptz 'epoch' + received_ms * interval '1 millisecond',
    timestamptz 'epoch' + verified_ms * interval '1 millisecond'
FROM r
"""
_COPY_REJECTED = (
    "COPY rejected_readings (payload, topic, meter_id, seq, reading_hash, reason, detail,"
    " received_at) FROM STDIN (FORMAT BINARY)"
)
_REJECTED_TYPES: Final = [
    "bytea", "text", "text", "numeric", "bytea", "text", "text", "timestamptz",
]  # fmt: skip
_COPY_EVENTS = "COPY security_events (type, severity, meter_id, detail) FROM STDIN (FORMAT BINARY)"
_EVENT_TYPES: Final = ["text", "text", "text", "jsonb"]  # enum labels travel as text
_FAILURES = """
SELECT meter_id FROM security_events
WHERE meter_id = ANY(%s) AND type = ANY(%s) AND at > now() - make_interval(secs => %s)
GROUP BY meter_id HAVING count(*) >= %s
"""
#: Only a meter whose readings are accepted can be quarantined by them; the literals come
#: from `registry.model.ACCEPTING`, the one list (a constant list keeps the plan simple).
_QUARANTINE = sql.SQL("""
UPDATE meters SET status = 'quarantined', updated_at = now()
WHERE meter_id = ANY(%s) AND status IN ({accepting})
RETURNING meter_id
""").format(accepting=sql.SQL(", ").join(sql.Literal(s.value) for s in sorted(ACCEPTING)))


#: Whether a batch in doubt is stored (`CommitInDoubt`): its accepted reading with the
#: times this worker received and verified it (another worker's copy has its own), or
#: its rejected message as received.
_WROTE_READING = """
SELECT EXISTS (SELECT FROM readings WHERE meter_id = %s AND seq = %s::numeric AND ts = %s
    AND received_at = %s AND verified_at = %s)
"""
_WROTE_REJECTION = """
SELECT EXISTS (SELECT FROM rejected_readings WHERE meter_id = %s AND received_at = %s
    AND payload = %s)
"""
_WROTE_UNNAMED = """
SELECT EXISTS (SELECT FROM rejected_readings WHERE meter_id IS NULL AND received_at = %s
    AND payload = %s)
"""


def _wrote(witness: Candidate | Rejection) -> tuple[str, tuple[object, ...]]:
    """The query and parameters that find `witness` as the batch in doubt wrote it."""
    received = ms_to_dt(witness.message.received_at_ms)
    if isinstance(witness, Candidate):
        r = witness.reading
        return _WROTE_READING, (
            r.meter_id,
            r.seq,
            ms_to_dt(r.ts),
            received,
            ms_to_dt(witness.verified_at_ms),
        )
    if witness.meter_id is None:
        return _WROTE_UNNAMED, (received, witness.message.payload)
    return _WROTE_REJECTION, (witness.meter_id, received, witness.message.payload)


def _witness(result: BatchResult, rejections: Sequence[Rejection]) -> Candidate | Rejection | None:
    """A row the batch wrote, if any: its first accepted reading, else its first rejection."""
    for o in result.outcomes:
        if isinstance(o, Accepted):
            return o.candidate
    if rejections:
        return rejections[0]
    return next((o for o in result.outcomes if isinstance(o, Rejection)), None)


def _messages(items: Iterable[Candidate | Rejection]) -> list[Message]:
    return [i.message for i in items]


class CommitInDoubt:
    """A batch whose COMMIT went out on a connection lost before the answer came: stored or
    not, nobody knows. The worker retries it on a new connection as any batch whose store
    failed; judged again, it found its own readings stored (`duplicate` receipts, not
    counted as accepted) and wrote its rejections a second time (rows and security
    events, which the quarantine counts). So the stores of one worker share this
    (`ingest.worker.postgres_store`), and the one given that batch again first asks
    whether it is stored (`_wrote`): then its outcomes stand. One query, on that retry
    only."""

    def __init__(self) -> None:
        self._messages: list[Message] = []
        self._result: BatchResult | None = None
        self._witness: Candidate | Rejection | None = None

    def keep(
        self, candidates: Sequence[Candidate], rejections: Sequence[Rejection], result: BatchResult
    ) -> None:
        """`result`, whose COMMIT got no answer; a batch that wrote nothing is judged the
        same again, and is not kept."""
        witness = _witness(result, rejections)
        if witness is not None:
            self._messages = _messages(chain(candidates, rejections))
            self._result, self._witness = result, witness

    def take(
        self, candidates: Sequence[Candidate], rejections: Sequence[Rejection]
    ) -> tuple[BatchResult, Candidate | Rejection] | None:
        """The batch in doubt and what shows it stored, if it is this batch (the worker
        gives a batch up only when stopping); no longer kept either way."""
        result, witness, messages = self._result, self._witness, self._messages
        self._messages, self._result, self._witness = [], None, None
        if result is None or witness is None:
            return None
        if messages != _messages(chain(candidates, rejections)):
            return None
        return result, witness


#: A store's writes of a batch inside the caller's transaction, and its parking of one
#: refused item (`PoisonGuard`).
Write = Callable[[Sequence[Candidate], Sequence[Rejection]], BatchResult]
Park = Callable[[Candidate | Rejection, psycopg.Error], BatchResult]


@dataclass(frozen=True, slots=True)
class PoisonGuard:
    """The module's poison-batch guard over a store's `write` (this one's, the API's): a
    refused batch is written in halves on savepoints until each refused item stands alone
    and is `park`ed. Halves go in arrival order, so a later half is judged against an
    earlier one exactly as a later batch would be."""

    conn: Connection[tuple[object, ...]]
    write: Write
    park: Park
    #: Locks the batch's meters, in order, for the transaction (halves locking theirs in
    #: turn could deadlock).
    lock: Callable[[Sequence[Candidate]], object]

    def rescue(
        self,
        candidates: Sequence[Candidate],
        rejections: Sequence[Rejection],
        refusal: psycopg.Error,
    ) -> BatchResult:
        """The batch whose transaction the database refused, in the caller's new one:
        every meter locked first, then divided."""
        log.warning(
            "batch_refused_bisecting",
            sqlstate=refusal.sqlstate,
            error=first_line(refusal),
            size=len(candidates) + len(rejections),
        )
        self.lock(candidates)
        return self.divide([*candidates, *rejections], refusal)

    def divide(self, items: Sequence[Candidate | Rejection], refusal: psycopg.Error) -> BatchResult:
        """Park a single refused item, else write each half on its own."""
        if len(items) == 1:
            return self.park(items[0], refusal)
        half = len(items) // 2
        first, second = self._bisect(items[:half]), self._bisect(items[half:])
        return BatchResult(
            [*first.outcomes, *second.outcomes], [*first.quarantined, *second.quarantined]
        )

    def _bisect(self, items: Sequence[Candidate | Rejection]) -> BatchResult:
        """Write the items on a savepoint; if the database refuses them, divide them."""
        try:
            with self.conn.transaction():
                return self.write(
                    [i for i in items if isinstance(i, Candidate)],
                    [i for i in items if isinstance(i, Rejection)],
                )
        except psycopg.Error as exc:
            if not refused(exc):
                raise
            return self.divide(items, exc)


def _unavailable(exc: psycopg.Error) -> UnavailableError:
    return UnavailableError("database", f"{type(exc).__name__}: {exc}")


# Arrays travel as one text literal each, cast in SQL: psycopg dumps a list element by
# element (measured ~4 us per reading and column).
def _numbers(values: Iterable[int | None]) -> str:
    return "{" + ",".join(["NULL" if v is None else str(v) for v in values]) + "}"


def _texts(values: Iterable[str | None]) -> str:
    """Every element quoted, so none is read as NULL or split at a comma."""
    return "{" + ",".join(["NULL" if v is None else _quoted(v) for v in values]) + "}"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _byteas(values: Iterable[bytes]) -> str:
    return "{" + ",".join(['"\\\\x' + v.hex() + '"' for v in values]) + "}"


def storable_text(text: str) -> str:
    """PostgreSQL `text` cannot hold NUL; the broker refuses such topics, the store must
    not depend on it (a refused COPY would be retried for ever)."""
    return text if "\x00" not in text else ascii(text)


class ReadingStore:
    """Owns one connection, in autocommit mode (the module says why); the worker calls it
    from one thread, batch after batch.

    Synchronous, on the worker's store thread (`ingest.worker`): an async connection on an
    event loop of its own cost ~0.45 ms more client CPU per 15-reading transaction
    (measured: 1.35-1.45 against 0.89-1.02 ms), the loop's reader registrations and task
    steps for each of the transaction's round trips. libpq's waits release the GIL."""

    def __init__(
        self,
        conn: Connection[tuple[object, ...]],
        *,
        limit: RateLimit,
        policy: QuarantinePolicy,
        in_doubt: CommitInDoubt | None = None,
    ) -> None:
        """`in_doubt`: shared with the stores of the worker's later connections."""
        if not conn.autocommit:
            raise ValueError("the store writes BEGIN and COMMIT itself: connect with autocommit")
        self._conn = conn
        self._limit = limit
        self._policy = policy
        self._in_doubt = CommitInDoubt() if in_doubt is None else in_doubt
        #: What the COMMIT in flight commits (`commit_batch`); None before it is sent.
        self._committing: BatchResult | None = None

    def close(self) -> None:
        self._conn.close()

    def abort(self) -> None:
        """From another thread: the transaction in hand fails now, as on a lost connection
        (`meterproof.db.silence`)."""
        cut(self._conn)

    def commit_batch(
        self, candidates: Sequence[Candidate], rejections: Sequence[Rejection]
    ) -> BatchResult:
        """One transaction (a savepoint inside a caller's); if the database refuses some of
        its rows, a second one that parks them and commits the rest (the module's
        poison-batch guard). The batch of a COMMIT left unanswered is looked for first
        (`CommitInDoubt`)."""
        stored = self.landed(candidates, rejections)
        if stored is not None:
            return stored
        self._committing = None
        try:
            return self._commit(candidates, rejections)
        except psycopg.Error as exc:
            if self._committing is not None and self._conn.broken:
                self.commit_lost(candidates, rejections, self._committing)
            raise _unavailable(exc) from exc

    def commit_lost(
        self, candidates: Sequence[Candidate], rejections: Sequence[Rejection], result: BatchResult
    ) -> None:
        """The batch's COMMIT went out and its connection was lost before the answer: kept
        for `landed` on the next connection. For a caller that commits the batch itself."""
        self._in_doubt.keep(candidates, rejections, result)

    def _commit(
        self, candidates: Sequence[Candidate], rejections: Sequence[Rejection]
    ) -> BatchResult:
        own = self._conn.info.transaction_status is TransactionStatus.IDLE
        try:
            if own:
                return self._own_transaction(candidates, rejections)
            with self._conn.transaction():
                return self._write(candidates, rejections)
        except psycopg.Error as exc:
            if not refused(exc):
                raise
            refusal = exc
        self._committing = None  # refused: not committed
        guard = PoisonGuard(self._conn, self._write, self._park, self._lock)
        with self._conn.transaction():
            result = guard.rescue(candidates, rejections, refusal)
            if own:
                self._committing = result  # the block's end sends the COMMIT
        return result

    def landed(
        self, candidates: Sequence[Candidate], rejections: Sequence[Rejection]
    ) -> BatchResult | None:
        """The outcomes of the batch in doubt if this is it and it is stored, else None.
        Under its meters' locks: a backend that has not yet seen its client go (waiting
        for a synchronous standby) holds them until its commit is seen or undone. A caller
        that commits the batch itself asks first, outside its transaction, with the batch
        it gave `commit_lost`."""
        doubt = self._in_doubt.take(candidates, rejections)
        if doubt is None:
            return None
        result, witness = doubt
        try:
            with self._conn.transaction(), self._conn.cursor() as cur:
                if candidates:
                    self._lock(candidates)
                cur.execute(*_wrote(witness))
                found = cur.fetchone() == (True,)
        except psycopg.Error as exc:
            self._in_doubt.keep(candidates, rejections, result)
            raise _unavailable(exc) from exc
        log.warning("commit_answer_lost", stored=found, size=len(candidates) + len(rejections))
        return result if found else None

    def _own_transaction(
        self, candidates: Sequence[Candidate], rejections: Sequence[Rejection]
    ) -> BatchResult:
        """`_write` between the BEGIN and COMMIT it sends; whatever fails in it, nothing of
        the batch stays, and no lock outlives it."""
        try:
            return self._write(candidates, rejections, own_transaction=True)
        except BaseException:
            with contextlib.suppress(psycopg.Error):  # a lost connection has no transaction
                self._conn.rollback()
            raise

    def _write(
        self,
        candidates: Sequence[Candidate],
        rejections: Sequence[Rejection],
        *,
        own_transaction: bool = False,
    ) -> BatchResult:
        """Judge and write the batch. `own_transaction`: BEGIN and COMMIT go in the
        pipelines too (two round trips without rejections); otherwise the caller holds the
        transaction. Rejections are written by COPY, which a pipeline cannot carry."""
        conn = self._conn
        with conn.pipeline() as pipeline, conn.cursor() as cur:
            if own_transaction:
                cur.execute("BEGIN")
            outcomes: list[Outcome] = []
            if candidates:
                contexts, halted = self._contexts(pipeline, candidates)
                outcomes = judge(candidates, contexts, limit=self._limit, halted=halted)
            self._write_accepted(cur, [o.candidate for o in outcomes if isinstance(o, Accepted)])
            all_rejections = [*rejections, *(o for o in outcomes if isinstance(o, Rejection))]
            if own_transaction and not all_rejections:
                self._committing = result = BatchResult(outcomes, [])
                cur.execute("COMMIT")
                return result
        self._write_rejections(all_rejections)
        result = BatchResult(outcomes, self._quarantine(all_rejections))
        if own_transaction:
            self._committing = result
            conn.execute("COMMIT")
        return result

    def _park(self, item: Candidate | Rejection, exc: psycopg.Error) -> BatchResult:
        """Keep a refused item's raw bytes in `rejected_readings` as `store_refused`. A
        refused candidate's outcome says so (its receipt: rejected, store_refused); a
        refused rejection keeps its own outcome, already decided before the store."""
        detail = f"SQLSTATE {exc.sqlstate}: {first_line(exc)}"
        if isinstance(item, Candidate):
            r = item.reading
            parked = Rejection(
                item.message, RejectReason.STORE_REFUSED, detail, r.meter_id, r.seq,
                item.reading_hash,
            )  # fmt: skip
        else:
            parked = Rejection(
                item.message, RejectReason.STORE_REFUSED, f"{item.reason.value}; {detail}",
                item.meter_id, item.seq, item.reading_hash,
            )  # fmt: skip
        with self._conn.transaction():
            self._write_rejections([parked])
        log.error(
            "reading_parked",
            meter_id=parked.meter_id,
            seq=parked.seq,
            reading_hash=None if parked.reading_hash is None else parked.reading_hash.hex(),
            sqlstate=exc.sqlstate,
            error=first_line(exc),
        )
        return BatchResult([parked] if isinstance(item, Candidate) else [], [])

    def stored_contexts(self, candidates: Sequence[Candidate]) -> list[StoredContext]:
        """Locks the candidates' meters (until the transaction ends) and reads what rules
        7-9 need of the stored readings, one context per candidate, in order."""
        with self._conn.pipeline() as pipeline:
            return self._contexts(pipeline, candidates)[0]

    def _contexts(
        self, pipeline: Pipeline, candidates: Sequence[Candidate]
    ) -> tuple[list[StoredContext], dict[str, str | None]]:
        """`stored_contexts` in the caller's pipeline, after whatever it has queued, and
        the meters whose readings rule 3 now refuses (`ingest.judge.judge`'s `halted`)."""
        meter_ids = [c.reading.meter_id for c in candidates]
        times = [c.reading.ts for c in candidates]
        early = overtaken(meter_ids, times, limit=self._limit)
        params = {
            "meters": _texts(meter_ids),
            "seqs": _numbers([c.reading.seq for c in candidates]),
            "ts": _numbers(times),
            "overtaken": None if early is None else "{" + ",".join("ft"[e] for e in early) + "}",
            "window": self._limit.window_ms,
            "max": self._limit.max_readings,
        }
        # In one round trip the server still runs the statements in turn, and under READ
        # COMMITTED the context's snapshot is taken after the lock was granted, so it sees
        # whatever the previous holder committed.
        with self._conn.cursor() as lock, self._conn.cursor() as cur:
            lock.execute(_LOCK, (_texts(sorted(set(meter_ids))),))
            cur.execute(_CONTEXT, params)
            pipeline.sync()
            halted = {str(m): None if s is None else str(s) for m, s in lock.fetchall()}
            contexts = [
                StoredContext(
                    None if h is None else bytes(h),  # type: ignore[call-overload]
                    int(n),  # type: ignore[call-overload]
                    None if bt is None else StoredPoint(bt, int(bi), int(be), int(bs)),  # type: ignore[arg-type,call-overload]
                    None if at is None else StoredPoint(at, int(ai), int(ae), int(as_)),  # type: ignore[arg-type,call-overload]
                    None if ahead is None else int(ahead),  # type: ignore[call-overload]
                )
                for h, n, bt, bi, be, bs, at, ai, ae, as_, ahead in cur.fetchall()
            ]
            dense = self._dense(contexts, meter_ids, times)
            if dense:
                cur.execute(_AROUND, {
                    "meters": _texts([meter_ids[i] for i in dense]),
                    "ts": _numbers([times[i] for i in dense]),
                    "window": self._limit.window_ms, "max": self._limit.max_readings,
                })  # fmt: skip
                pipeline.sync()
                for i, (around,) in zip(dense, cur.fetchall(), strict=True):
                    contexts[i] = replace(contexts[i], around=tuple(around))  # type: ignore[arg-type]
        return contexts, halted

    def _dense(
        self, contexts: Sequence[StoredContext], meter_ids: Sequence[str], times: Sequence[int]
    ) -> list[int]:
        """The candidates whose `around` the judge needs (`ingest.judge.needs_around`)."""
        counted = [i for i, c in enumerate(contexts) if c.ahead is not None]
        if not counted:
            return []
        near = batch_near(meter_ids, times, limit=self._limit)
        return [
            i
            for i in counted
            if needs_around(contexts[i].in_window, contexts[i].ahead or 0, near(i), self._limit)
        ]

    def _lock(self, candidates: Sequence[Candidate]) -> None:
        """`FOR UPDATE` on the candidates' meters, in meter id order, until the transaction
        ends; taking a lock again is free."""
        with self._conn.cursor() as cur:
            cur.execute(_LOCK, (_texts(sorted({c.reading.meter_id for c in candidates})),))

    def _write_accepted(
        self, cur: psycopg.Cursor[tuple[object, ...]], accepted: Sequence[Candidate]
    ) -> None:
        if not accepted:
            return
        readings = [c.reading for c in accepted]
        cur.execute(
            _INSERT_ACCEPTED,
            {
                "meter_id": _texts([r.meter_id for r in readings]),
                "seq": _numbers([r.seq for r in readings]),
                "hash": _byteas([c.reading_hash for c in accepted]),
                "ts": _numbers([r.ts for r in readings]),
                "import": _numbers([r.import_wh for r in readings]),
                "export": _numbers([r.export_wh for r in readings]),
                "power": _numbers([r.power_w for r in readings]),
                "voltage": _numbers([r.voltage_mv for r in readings]),
                "current": _numbers([r.current_ma for r in readings]),
                "frequency": _numbers([r.frequency_mhz for r in readings]),
                "power_factor": _numbers([r.power_factor_milli for r in readings]),
                "alg": _texts([r.alg for r in readings]),
                "kid": _texts([r.kid for r in readings]),
                "sig": _byteas([b64url_decode(r.sig) for r in readings]),
                "received": _numbers([c.message.received_at_ms for c in accepted]),
                "verified": _numbers([c.verified_at_ms for c in accepted]),
            },
        )

    def _write_rejections(self, rejections: Sequence[Rejection]) -> None:
        if not rejections:
            return
        with self._conn.cursor() as cur:
            with cur.copy(_COPY_REJECTED) as copy:
                copy.set_types(_REJECTED_TYPES)
                for j in rejections:
                    copy.write_row(
                        (
                            j.message.payload, storable_text(j.message.topic),
                            j.meter_id, j.seq, j.reading_hash, j.reason.value, j.detail,
                            ms_to_dt(j.message.received_at_ms),
                        )
                    )  # fmt: skip
            with cur.copy(_COPY_EVENTS) as copy:
                copy.set_types(_EVENT_TYPES)
                for j in rejections:
                    event = event_for(j)
                    copy.write_row(
                        (
                            event.type,
                            event.severity,
                            j.meter_id,
                            Jsonb(event.detail),
                        )
                    )

    def _quarantine(self, rejections: Sequence[Rejection]) -> list[str]:
        suspects = sorted(
            {j.meter_id for j in rejections if j.meter_id and self._policy.counts(j.reason)}
        )
        if not suspects:
            return []
        with self._conn.cursor() as cur:
            cur.execute(
                _FAILURES,
                (
                    suspects,
                    sorted(self._policy.event_types()),
                    self._policy.window_s,
                    self._policy.failures,
                ),
            )
            over = [str(row[0]) for row in cur.fetchall()]
            if not over:
                return []
            cur.execute(_QUARANTINE, (over,))
            quarantined = [str(row[0]) for row in cur.fetchall()]
            for meter_id in quarantined:
                cur.execute(
                    "INSERT INTO security_events (type, severity, meter_id, detail)"
                    " VALUES ('quarantined', 'critical', %s, %s)",
                    (
                        meter_id,
                        Jsonb(
                            {
                                "failures": self._policy.failures,
                                "window_s": self._policy.window_s,
                                "by": "ingest",
                            }
                        ),
                    ),
                )
        return quarantined
