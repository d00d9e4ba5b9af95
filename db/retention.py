"""Retention: raw readings leave `readings` and `reading_log` once the ledger has anchored
them and they are older than the kept window, so neither table grows for ever; what they
meant for billing stays in `meter_rollups`, and what the ledger proves stays in the ledger.

What is removed, and in which order (`prune`):
  1. retire anchored batches as a prefix in batch order, each only if all its readings
     are older than the horizon; one transaction per batch records, from its readings,
     the per-meter watermark (latest reading in (ts, seq) order, highest seq), the
     bridge's mint state after it (`retired_mint_state`, for `ledger verify`) and the
     `retired_batches` row. A reading the bridge has not anchored is never retired.
  2. delete the retired batches' rows from both tables, `chunk_rows` per transaction;
  3. drop the daily `readings` partitions that ended before the horizon and are empty.

Why the judge and the rollups stay exact (tests/test_retention.py compares them with a
database that kept everything): every retired reading is older than the horizon, and the
horizon is older than anything a worker still judges (`RetentionSettings` refuses a
`retain_days` that is not above the workers' max_age_s + rate window + an hour of clock
margin), so for any candidate
  - rule 8's reading just before it is the later of reading_log's and the watermark
    (every retired reading is earlier than the candidate, and the watermark is the latest
    of them); the reading just after it and its rate window are never retired;
  - a seq at or below the highest retired seq and absent from reading_log was stored with
    a ts before the horizon, so the candidate (ts after it) carries other values: the
    answer was, and stays, seq_reused. A seq below it that was never stored would now be
    refused too; a meter following reading-v1 section 11 (seq reserved before signing,
    ts taken at signing) cannot send one with a ts after the horizon;
  - the rollup trigger's predecessor is the later of reading_log's and the watermark,
    the same reading as in the full history.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row
from pydantic import Field, model_validator

from meterproof.config import Settings

#: Between the pruner's clock and the workers'.
_CLOCK_MARGIN_S: Final = 3600
#: Serialises pruners on one database (db.migrate uses ...184, ...185, the bridge ...186).
_LOCK_KEY: Final = 7302166411205843187
_NEXT: Final = """
SELECT b.batch, b.status, (SELECT max(ts) FROM reading_log WHERE batch_id = b.batch)
FROM bridge_batches b
WHERE b.batch > (SELECT coalesce(max(batch), 0) FROM retired_batches)
ORDER BY b.batch LIMIT 1
"""
_WATERMARKS: Final = """
INSERT INTO reading_watermarks AS w (meter_id, ts, seq, import_wh, export_wh, max_seq)
SELECT DISTINCT ON (meter_id) meter_id, ts, seq, import_wh, export_wh,
       max(seq) OVER (PARTITION BY meter_id)
FROM reading_log WHERE batch_id = %(batch)s
ORDER BY meter_id, ts DESC, seq DESC
ON CONFLICT (meter_id) DO UPDATE SET
    ts = CASE WHEN (EXCLUDED.ts, EXCLUDED.seq) > (w.ts, w.seq) THEN EXCLUDED.ts ELSE w.ts END,
    seq = CASE WHEN (EXCLUDED.ts, EXCLUDED.seq) > (w.ts, w.seq) THEN EXCLUDED.seq ELSE w.seq END,
    import_wh = CASE WHEN (EXCLUDED.ts, EXCLUDED.seq) > (w.ts, w.seq)
                     THEN EXCLUDED.import_wh ELSE w.import_wh END,
    export_wh = CASE WHEN (EXCLUDED.ts, EXCLUDED.seq) > (w.ts, w.seq)
                     THEN EXCLUDED.export_wh ELSE w.export_wh END,
    max_seq = GREATEST(w.max_seq, EXCLUDED.max_seq)
"""
#: bridge.mint.advance in SQL: a meter's first batch sets its baseline from its first
#: reading in (ts, seq) order; every batch raises the maxima to its own.
_MINT_STATE: Final = """
WITH batch AS (
    SELECT meter_id, seq, ts, import_wh, export_wh FROM reading_log WHERE batch_id = %(batch)s
), firsts AS (
    SELECT DISTINCT ON (meter_id) meter_id, export_wh, import_wh FROM batch
    ORDER BY meter_id, ts, seq
), tops AS (
    SELECT meter_id, max(export_wh) AS export_wh, max(import_wh) AS import_wh
    FROM batch GROUP BY meter_id
)
INSERT INTO retired_mint_state AS s (meter_id, baseline_export_wh, baseline_import_wh,
    max_export_wh, max_import_wh, first_batch, last_batch)
SELECT f.meter_id, f.export_wh, f.import_wh, t.export_wh, t.import_wh, %(batch)s, %(batch)s
FROM firsts f JOIN tops t USING (meter_id)
ON CONFLICT (meter_id) DO UPDATE SET
    max_export_wh = GREATEST(s.max_export_wh, EXCLUDED.max_export_wh),
    max_import_wh = GREATEST(s.max_import_wh, EXCLUDED.max_import_wh),
    last_batch = EXCLUDED.last_batch
"""
_RETIRE: Final = """
INSERT INTO retired_batches (batch, readings)
SELECT %(batch)s, count(*) FROM reading_log WHERE batch_id = %(batch)s
RETURNING readings
"""
#: One chunk: the rows of retired batches, from both tables (readings found by its unique
#: key, which holds the partition key ts), and the history pages of their quarters
#: (api/pages.py).
_DELETE_CHUNK: Final = """
WITH gone AS (
    DELETE FROM reading_log WHERE (meter_id, seq) IN (
        SELECT meter_id, seq FROM reading_log
        WHERE batch_id <= (SELECT max(batch) FROM retired_batches) LIMIT %s)
    RETURNING meter_id, seq, ts
), deleted AS (
    DELETE FROM readings r USING gone g
    WHERE r.meter_id = g.meter_id AND r.seq = g.seq AND r.ts = g.ts
    RETURNING 1
), unpaged AS (
    -- a page of a quarter that lost readings would still match the quarter's count
    DELETE FROM history_pages p USING gone g
    WHERE p.meter_id = g.meter_id
      AND p.bucket = date_bin(interval '15 minutes', g.ts, timestamptz '2000-01-01 00:00:00+00')
)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM deleted)
"""
_PARTITIONS: Final = """
SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'readings'::regclass AND c.relname ~ '^readings_[0-9]{8}$'
ORDER BY c.relname
"""
_KEPT: Final = """
SELECT count(*) FROM reading_log
WHERE ts < %s AND (batch_id IS NULL OR batch_id > (SELECT coalesce(max(batch), 0)
                                                   FROM retired_batches))
"""


class RetentionSettings(Settings):
    """How long raw readings stay after they are anchored (`meterproof db prune`)."""

    retain_days: int = Field(
        default=30,
        ge=1,
        le=36_500,  # a century: "keep for ever" typed as days stays a date
        description="raw readings older than this many days are removed once anchored; "
        "more than the workers' max_age_s + rate_window_s + an hour (8 days by default)",
    )
    prune_chunk_rows: int = Field(
        default=10_000, ge=1, le=1_000_000, description="rows deleted per transaction"
    )
    # The workers' own settings (the same variables as ingest.settings.IngestSettings):
    # what they still judge against reading_log must never be retired.
    max_age_s: int = Field(default=7 * 24 * 3600, gt=0)
    rate_window_s: int = Field(default=60, gt=0)

    @model_validator(mode="after")
    def _behind_the_judge(self) -> RetentionSettings:
        needed_s = self.max_age_s + self.rate_window_s + _CLOCK_MARGIN_S
        if self.retain_days * 86_400 < needed_s:
            raise ValueError(
                f"retain_days must cover max_age_s + rate_window_s + an hour"
                f" ({needed_s / 86_400:.2f} days): the workers judge against what it keeps"
            )
        return self


@dataclass(slots=True)
class PruneReport:
    horizon: datetime
    retired_batches: list[int] = field(default_factory=list)
    retired_readings: int = 0
    deleted_log_rows: int = 0
    deleted_readings: int = 0
    dropped_partitions: list[str] = field(default_factory=list)
    #: older than the horizon, kept: not anchored yet, or batched with newer readings
    kept_older: int = 0


def horizon_for(retain_days: int, now: datetime | None = None) -> datetime:
    return (now or datetime.now(UTC)) - timedelta(days=retain_days)


def prune(
    conn: psycopg.Connection[Any],
    *,
    horizon: datetime,
    chunk_rows: int,
    progress: Callable[[str], None] = lambda _: None,
) -> PruneReport:
    """Retire, delete and drop what is older than `horizon` and anchored (see the module).
    `conn` must be in autocommit mode: every step is its own transaction, so a pruner
    stopped half-way leaves a consistent database and the next run carries on."""
    if horizon.tzinfo is None:
        raise ValueError("the horizon must be timezone-aware")
    report = PruneReport(horizon)
    while (retired := _retire_next(conn, horizon)) is not None:
        batch, readings = retired
        report.retired_batches.append(batch)
        report.retired_readings += readings
        progress(f"retired batch {batch} ({readings:,} readings)")
    while True:
        with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            row = cur.execute(_DELETE_CHUNK, (chunk_rows,)).fetchone()
        assert row is not None
        log_rows, readings = int(row[0]), int(row[1])
        if not log_rows:
            break
        report.deleted_log_rows += log_rows
        report.deleted_readings += readings
        progress(f"deleted {report.deleted_log_rows:,} reading_log rows and "
                 f"{report.deleted_readings:,} readings")  # fmt: skip
    report.dropped_partitions = _drop_partitions(conn, horizon, progress)
    with conn.cursor(row_factory=tuple_row) as cur:
        kept = cur.execute(_KEPT, (horizon,)).fetchone()
    assert kept is not None
    report.kept_older = int(kept[0])
    return report


def _retire_next(conn: psycopg.Connection[Any], horizon: datetime) -> tuple[int, int] | None:
    """Retire the batch after the last retired one if it is anchored and wholly older
    than the horizon; (batch, readings), or None when there is none to retire."""
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        row = cur.execute(_NEXT).fetchone()
        if row is None:
            return None
        batch, status, newest = int(row[0]), str(row[1]), row[2]
        if status != "anchored" or (newest is not None and newest >= horizon):
            return None
        params = {"batch": batch}
        cur.execute(_WATERMARKS, params)
        cur.execute(_MINT_STATE, params)
        retired = cur.execute(_RETIRE, params).fetchone()
    assert retired is not None
    return batch, int(retired[0])


def _drop_partitions(
    conn: psycopg.Connection[Any], horizon: datetime, progress: Callable[[str], None]
) -> list[str]:
    """Empty daily partitions whose day ended before the horizon. A reading for such a day
    would be refused as stale, so none can arrive; the lock is bounded all the same,
    because inserts into `readings` queue behind it."""
    with conn.cursor(row_factory=tuple_row) as cur:
        names = [str(r[0]) for r in cur.execute(_PARTITIONS).fetchall()]
    dropped: list[str] = []
    for name in names:
        day = datetime.strptime(name.removeprefix("readings_"), "%Y%m%d").replace(tzinfo=UTC)
        if day + timedelta(days=1) > horizon:
            continue
        table = sql.Identifier(name)
        try:
            with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                if cur.execute("SELECT to_regclass(%s)", (name,)).fetchone() == (None,):
                    continue  # a pruner running beside this one dropped it since the list
                cur.execute("SET LOCAL lock_timeout = '5s'")
                # the parent first, as inserts take them, so the two cannot deadlock
                cur.execute(
                    sql.SQL("LOCK TABLE readings, {} IN ACCESS EXCLUSIVE MODE").format(table)
                )
                if cur.execute(sql.SQL("SELECT 1 FROM {} LIMIT 1").format(table)).fetchone():
                    continue
                cur.execute(sql.SQL("DROP TABLE {}").format(table))
        except psycopg.errors.LockNotAvailable:
            progress(f"kept {name}: busy, dropped by a later run")
            continue
        dropped.append(name)
        progress(f"dropped empty partition {name}")
    return dropped
