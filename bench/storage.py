"""Storage per reading and per meter-day, before and after retention, with rollups
(the figures in docs/scaling.md):

    .venv/bin/python -P -m meterproof.bench.storage --meters 500 --days 10 --keep-days 2

On a private PostgreSQL cluster in a temporary folder, migrated: M meters report every 15
minutes for D days, written as ingest's store writes them (binary COPY into reading_log
and readings, one transaction per 15-minute round, so the rollup trigger runs as it does
in production); the bridge seals hourly epochs and the local ledger anchors them all.
Sizes are `pg_total_relation_size` (heap, TOAST, indexes) after VACUUM ANALYZE; then
`prune` keeps the last K days and the sizes are taken again, after a plain VACUUM (the
space a running database reuses) and after VACUUM FULL (what the kept rows occupy).
The same run times a round of writes with the rollup trigger on and off, alternated.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import click
import psycopg

from meterproof.bench.bridge import Row, _register, _write
from meterproof.bridge.batches import BatchStore
from meterproof.bridge.ledger.local import LocalSink
from meterproof.bridge.oracle import Oracle
from meterproof.bridge.rehash import reading_hash
from meterproof.db.migrate import migrate
from meterproof.db.retention import prune
from meterproof.schemas.signatures import Ed25519Public, generate_private_key
from meterproof.schemas.timestamps import ms_to_dt
from meterproof.stack.postgres import PostgresServer

START_MS: Final = 1_767_225_600_000  # 2026-01-01T00:00:00Z
QUARTER_MS: Final = 900_000
DAY_MS: Final = 86_400_000
TABLES: Final = ("readings", "reading_log", "meter_quarters", "reading_watermarks",
                 "retired_batches", "retired_mint_state")  # fmt: skip
#: A table, or the sum of its partitions (heap, TOAST, indexes).
_SIZE: Final = """
SELECT pg_total_relation_size(%(t)s::regclass) + coalesce((
    SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree(%(t)s::regclass)
    WHERE relid <> %(t)s::regclass), 0)::int8
"""


def _rows(meters: int, slot: int) -> list[Row]:
    """Every meter's reading of one 15-minute round (registers rising, a little jitter)."""
    ts0 = START_MS + slot * QUARTER_MS
    rows: list[Row] = []
    for m in range(meters):
        meter_id = f"bench-{m:07d}"
        ts = ts0 + m % 1000
        imp, exp, power = 1_000_000 + 250 * slot + m, 50_000 + (m % 13) * slot, m % 5000 - 2500
        digest = reading_hash(meter_id, (slot, ts, imp, exp), (power, None, None, None, None))
        rows.append((meter_id, slot, ts, imp, exp, power, digest))
    return rows


def _sizes(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, int]]:
    """table -> (bytes, rows)."""
    out: dict[str, tuple[int, int]] = {}
    for table in TABLES:
        size = conn.execute(_SIZE, {"t": table}).fetchone()
        rows = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608
        assert size is not None
        assert rows is not None
        out[table] = (int(size[0]), int(rows[0]))
    return out


def _anchor_all(conn: psycopg.Connection[Any], database_url: str, end_ms: int) -> int:
    key = generate_private_key("EdDSA")
    public = key.public_key()
    assert isinstance(public, Ed25519Public)
    oracle = Oracle(key, public.raw)
    store = BatchStore(conn)
    store.advance(end_ms, epoch_ms=4 * QUARTER_MS, delay_ms=0, oracle=oracle)
    sink = LocalSink(database_url, trusted_key=oracle.public_key, timeout_s=60)
    anchored = 0
    try:
        while (pending := store.first_pending()) is not None:
            receipt = sink.submit(pending.entry, pending.entry.header.idempotency_key)
            store.mark_anchored(pending.batch, receipt)
            anchored += 1
    finally:
        sink.close()
    return anchored


def _trigger_cost(conn: psycopg.Connection[Any], meters: int, rounds: int) -> tuple[float, float]:
    """Seconds per round with the rollup trigger on and off, rounds alternated, written
    into this database before the measured data (and removed again)."""
    on = off = 0.0
    for slot in range(2 * rounds):
        rows = _rows(meters, slot)
        enabled = slot % 2 == 0
        verb = "ENABLE" if enabled else "DISABLE"
        conn.execute(f"ALTER TABLE reading_log {verb} TRIGGER reading_log_rollups")
        began = time.perf_counter()
        _write(conn, rows)
        spent = time.perf_counter() - began
        on, off = (on + spent, off) if enabled else (on, off + spent)
    conn.execute("ALTER TABLE reading_log ENABLE TRIGGER reading_log_rollups")
    for table in ("readings", "reading_log", "meter_quarters"):
        conn.execute(f"TRUNCATE {table}")
    return on / rounds, off / rounds


def measure(
    directory: Path, *, meters: int, days: int, keep_days: int, progress: Callable[[str], None]
) -> str:
    """Run the measurement; return the report (markdown)."""
    server = PostgresServer(directory=directory / "postgres")
    server.start()
    try:
        url = server.url
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "SELECT meterproof_ensure_partitions(%s, %s)",
                (ms_to_dt(START_MS), ms_to_dt(START_MS + days * DAY_MS)),
            )
            _register(conn, meters)
            trigger_on, trigger_off = _trigger_cost(conn, meters, rounds=20)
            progress(f"a round of {meters} readings: {trigger_on * 1000:.1f} ms with the rollup "
                     f"trigger, {trigger_off * 1000:.1f} ms without")  # fmt: skip
            began = time.perf_counter()
            for slot in range(days * 96):
                _write(conn, _rows(meters, slot))
                if slot % 96 == 95:
                    progress(f"day {slot // 96 + 1} of {days} written")
            write_s = time.perf_counter() - began
            batches = _anchor_all(conn, url, START_MS + days * DAY_MS + 1)
            progress(f"{batches} batches sealed and anchored")
            conn.execute("VACUUM ANALYZE")
            before = _sizes(conn)
            began = time.perf_counter()
            report = prune(
                conn,
                horizon=ms_to_dt(START_MS + (days - keep_days) * DAY_MS),
                chunk_rows=50_000,
                progress=lambda line: None,
            )
            prune_s = time.perf_counter() - began
            progress(f"pruned {report.retired_readings:,} readings in {prune_s:.1f} s")
            conn.execute("VACUUM ANALYZE")
            after = _sizes(conn)
            conn.execute("VACUUM FULL")
            compact = _sizes(conn)
    finally:
        server.remove()
    return _report(
        meters=meters, days=days, keep_days=keep_days, before=before, after=after,
        compact=compact, write_s=write_s, prune_s=prune_s, retired=report.retired_readings,
        trigger=(trigger_on, trigger_off),
    )  # fmt: skip


def _report(
    *,
    meters: int,
    days: int,
    keep_days: int,
    before: dict[str, tuple[int, int]],
    after: dict[str, tuple[int, int]],
    compact: dict[str, tuple[int, int]],
    write_s: float,
    prune_s: float,
    retired: int,
    trigger: tuple[float, float],
) -> str:
    meter_days = meters * days
    lines = [
        f"{meters} meters x {days} days x 96 readings = {before['readings'][1]:,} readings;"
        f" retention keeps the last {keep_days} days",
        "",
        "| table | before: bytes | rows | bytes/row | after prune + VACUUM | after VACUUM FULL"
        " | rows after |",
        "|---|---|---|---|---|---|---|",
    ]
    for table in TABLES:
        (b, n), (a, _), (c, m) = before[table], after[table], compact[table]
        per_row = f"{b / n:.0f}" if n else "-"
        lines.append(f"| `{table}` | {b:,} | {n:,} | {per_row} | {a:,} | {c:,} | {m:,} |")
    total_before = sum(v[0] for v in before.values())
    total_compact = sum(v[0] for v in compact.values())
    raw_before = before["readings"][0] + before["reading_log"][0]
    rollups = before["meter_quarters"][0]
    lines += [
        "",
        f"- per reading, raw (`readings` + `reading_log`):"
        f" {raw_before / before['readings'][1]:.0f} B",
        f"- per meter-day, everything kept: {total_before / meter_days:,.0f} B"
        f" (raw {raw_before / meter_days:,.0f} B, rollups {rollups / meter_days:,.0f} B)",
        f"- per meter-day after retention, all tables (compacted) over the {days} days:"
        f" {total_compact / meter_days:,.0f} B; a retired meter-day keeps only its rollups"
        f" ({compact['meter_quarters'][0] / meter_days:,.0f} B)",
        f"- writing: {before['readings'][1] / write_s:,.0f} readings/s (both tables, rollups"
        f" included); a round of {meters}: {trigger[0] * 1000:.1f} ms with the rollup trigger,"
        f" {trigger[1] * 1000:.1f} ms without (20 rounds each, alternated)",
        f"- prune: {retired:,} readings retired and deleted in {prune_s:.1f} s"
        f" ({retired / prune_s:,.0f} readings/s)",
    ]
    return "\n".join(lines)


@click.command()
@click.option("--meters", type=click.IntRange(1, 100_000), default=500, show_default=True)
@click.option("--days", type=click.IntRange(2, 366), default=10, show_default=True)
@click.option("--keep-days", type=click.IntRange(1, 365), default=2, show_default=True)
def main(meters: int, days: int, keep_days: int) -> None:
    """Measure storage per reading and per meter-day before and after retention."""
    if keep_days >= days:
        raise click.BadParameter("must be below --days", param_hint="--keep-days")
    with tempfile.TemporaryDirectory(prefix="meterproof-storage-") as tmp:
        Path(tmp).chmod(0o755)  # PostgreSQL runs as its own unprivileged user
        click.echo(
            measure(Path(tmp), meters=meters, days=days, keep_days=keep_days,
                    progress=lambda line: click.echo(line, err=True))
        )  # fmt: skip


if __name__ == "__main__":
    main()
