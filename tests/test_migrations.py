"""The migration runner and the readings schema, against the session PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from meterproof.db.cli import db
from meterproof.db.migrate import MigrationError, ensure_partitions, load_migrations, migrate
from meterproof.registry import repository
from meterproof.registry.model import MeterStatus, NewKey, NewMeter
from meterproof.schemas.reading import RejectReason
from meterproof.schemas.signatures import generate_private_key
from meterproof.stack.postgres import PostgresServer

U64_MAX = 2**64 - 1


@pytest.fixture
def empty_url(postgres: PostgresServer) -> Iterator[str]:
    """A database of this test's own with nothing in it, dropped afterwards."""
    name = f"test_mig_{uuid.uuid4().hex}"
    admin = postgres.database_url("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield postgres.database_url(name)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def _connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


def _register(conn: psycopg.Connection[Any], meter_id: str) -> None:
    key = NewKey.parse("EdDSA", generate_private_key("EdDSA").public_key().pem())
    repository.register(conn, [NewMeter(meter_id=meter_id, key=key)])


def _reading(conn: psycopg.Connection[Any], meter_id: str, seq: int, ts: datetime) -> None:
    conn.execute(
        "INSERT INTO readings (meter_id, seq, ts, import_wh, export_wh, alg, sig, reading_hash,"
        " received_at, verified_at) VALUES (%s, %s, %s, 1, 0, 'EdDSA', %s, %s, now(), now())",
        (meter_id, seq, ts, b"\x01" * 64, hashlib.sha256(f"{meter_id}{seq}".encode()).digest()),
    )


def test_migrate_applies_every_file_once_and_records_checksums(empty_url: str) -> None:
    files = load_migrations()
    assert [m.version for m in files][:2] == ["0001_registry", "0002_readings"]
    assert migrate(empty_url) == [m.version for m in files]
    assert migrate(empty_url) == []
    with _connect(empty_url) as conn:
        rows = conn.execute("SELECT version, sha256 FROM schema_migrations ORDER BY 1").fetchall()
    assert rows == [(m.version, hashlib.sha256(m.sql).hexdigest()) for m in files]


def test_concurrent_runners_apply_each_migration_once(empty_url: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate(empty_url))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    applied = sorted(version for result in results for version in result)
    assert applied == [m.version for m in load_migrations()]


def test_a_changed_applied_migration_is_an_error(empty_url: str) -> None:
    migrate(empty_url)
    with _connect(empty_url) as conn:
        conn.execute(
            "UPDATE schema_migrations SET sha256 = %s WHERE version = '0001_registry'", ("0" * 64,)
        )
    with pytest.raises(MigrationError, match=r"0001_registry\.sql changed after it was applied"):
        migrate(empty_url)
    result = CliRunner().invoke(db, ["migrate", "--database-url", empty_url])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert "changed after it was applied" in result.output


def test_an_applied_migration_without_a_file_is_an_error(empty_url: str) -> None:
    migrate(empty_url)
    with _connect(empty_url) as conn:
        conn.execute("INSERT INTO schema_migrations (version, sha256) VALUES ('0000_gone', 'x')")
    with pytest.raises(MigrationError, match="0000_gone has no file"):
        migrate(empty_url)


def test_a_database_newer_than_the_code_is_named_as_such(empty_url: str) -> None:
    """Not "renamed or deleted": an older meterproof (a rollback, a worker not yet
    upgraded) meets a migration it has never heard of."""
    migrate(empty_url)
    newest = load_migrations()[-1].version
    with _connect(empty_url) as conn:
        conn.execute("INSERT INTO schema_migrations (version, sha256) VALUES ('9999_next', 'x')")
    with pytest.raises(MigrationError) as raised:
        migrate(empty_url)
    assert str(raised.value) == (
        f"the database has migration 9999_next, newer than this meterproof's newest"
        f" ({newest}): run the meterproof that applied it, or a newer one"
    )


def test_migrate_command_prints_versions_and_reports_an_unreachable_database(
    empty_url: str, postgres: PostgresServer
) -> None:
    runner = CliRunner()
    first = runner.invoke(db, ["migrate", "--database-url", empty_url])
    assert first.exit_code == 0, first.output
    versions = [m.version for m in load_migrations()]
    assert versions[:2] == ["0001_registry", "0002_readings"]
    assert first.output == f"applied {' '.join(versions)}\n"
    again = runner.invoke(db, ["migrate"], env={"METERPROOF_DATABASE_URL": empty_url})
    assert again.output.startswith("up to date")
    closed = postgres.database_url("x").replace(f":{postgres.port}/", ":1/")
    down = runner.invoke(db, ["migrate", "--database-url", closed])
    assert down.exit_code == 1
    assert down.output.startswith("Error: database unreachable")
    assert down.output.count("\n") == 1


def _timescale(conn: psycopg.Connection[Any]) -> bool:
    """Which mode migration 0002 chose for this server (tests run on both: the Debian
    packages have no TimescaleDB, `--servers=docker` runs the TimescaleDB image)."""
    row = conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    return row == (1,)


def test_timescaledb_is_used_exactly_when_the_server_can_load_it(database_url: str) -> None:
    with _connect(database_url) as conn:
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),"
            " current_setting('shared_preload_libraries') LIKE '%timescaledb%'"
        ).fetchone()
        assert row is not None
        assert _timescale(conn) == (row[0] and row[1])


def test_readings_are_split_by_day_in_either_mode(database_url: str) -> None:
    """Native range partitions of one UTC day (this week's made ahead, a DEFAULT one), or
    a hypertable on ts with one-day chunks and no native partitioning."""
    with _connect(database_url) as conn:
        strategy = conn.execute(
            "SELECT partstrat FROM pg_partitioned_table WHERE partrelid = 'readings'::regclass"
        ).fetchone()
        if _timescale(conn):
            assert strategy is None
            dimension = conn.execute(
                "SELECT column_name, time_interval FROM timescaledb_information.dimensions"
                " WHERE hypertable_name = 'readings'"
            ).fetchall()
            assert dimension == [("ts", timedelta(days=1))]
            return
        assert strategy == ("r",)
        today = datetime.now(UTC).strftime("%Y%m%d")
        week = (datetime.now(UTC) + timedelta(days=7)).strftime("%Y%m%d")
        for name in (f"readings_{today}", f"readings_{week}", "readings_default"):
            assert conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() != (None,)


def test_readings_far_in_the_past_or_future_are_stored_in_either_mode(
    database_url: str,
) -> None:
    """Natively in the DEFAULT partition (no day partition that far out), under
    TimescaleDB in a chunk of their own day."""
    with _connect(database_url) as conn:
        _register(conn, "m1")
        _reading(conn, "m1", 1, datetime(1999, 1, 1, tzinfo=UTC))
        _reading(conn, "m1", 2, datetime(2200, 1, 1, 12, tzinfo=UTC))
        _reading(conn, "m1", 3, datetime.now(UTC))
        where = dict(
            conn.execute("SELECT seq::int, tableoid::regclass::text FROM readings").fetchall()
        )
        assert sorted(where) == [1, 2, 3]
        if _timescale(conn):
            assert len(set(where.values())) == 3
            assert all(w.startswith("_timescaledb_internal.") for w in where.values())
            return
        assert where[1] == where[2] == "readings_default"
        assert where[3] == f"readings_{datetime.now(UTC):%Y%m%d}"


def test_creating_a_partition_moves_its_rows_out_of_the_default_partition(
    database_url: str,
) -> None:
    """Under TimescaleDB there is nothing to create: the function says so (0)."""
    far = datetime(2200, 1, 1, 12, tzinfo=UTC)
    with _connect(database_url) as conn:
        _register(conn, "m1")
        _reading(conn, "m1", 1, far)
        created = conn.execute("SELECT meterproof_ensure_partitions(%s, %s)", (far, far)).fetchone()
        if _timescale(conn):
            assert created == (0,)
            return
        assert created == (1,)
        assert conn.execute("SELECT tableoid::regclass::text FROM readings").fetchall() == [
            ("readings_22000101",)
        ]


def test_ensure_partitions_creates_the_coming_days_once(database_url: str) -> None:
    with _connect(database_url) as conn:
        assert ensure_partitions(conn) == 0  # the migration made this week's, or TimescaleDB
        expected = 0 if _timescale(conn) else 23
        assert ensure_partitions(conn, days_ahead=30) == expected
        assert ensure_partitions(conn, days_ahead=30) == 0
        if not _timescale(conn):
            last = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y%m%d")
            assert conn.execute("SELECT to_regclass(%s)", (f"readings_{last}",)).fetchone() != (
                None,
            )
        with pytest.raises(ValueError, match="days_ahead"):
            ensure_partitions(conn, days_ahead=-1)


def test_reading_log_keeps_meter_and_seq_unique_and_u64_in_range(database_url: str) -> None:
    now = datetime.now(UTC)
    insert = (
        "INSERT INTO reading_log (meter_id, seq, reading_hash, ts, import_wh, export_wh)"
        " VALUES ('m1', %s, %s, %s, %s, 0)"
    )
    with _connect(database_url) as conn:
        _register(conn, "m1")
        conn.execute(insert, (U64_MAX, b"\x01" * 32, now, U64_MAX))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(insert, (U64_MAX, b"\x02" * 32, now + timedelta(seconds=1), 0))
        for bad in (U64_MAX + 1, -1):
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute(insert, (bad, b"\x01" * 32, now, 0))
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute(insert.replace("'m1'", "'unregistered'"), (1, b"\x01" * 32, now, 0))
        stored = conn.execute("SELECT seq, import_wh, batch_id FROM reading_log").fetchone()
        assert stored == (U64_MAX, U64_MAX, None)


def test_timestamps_are_kept_to_the_millisecond(database_url: str) -> None:
    ts = datetime(2030, 5, 6, 7, 8, 9, 123_000, tzinfo=UTC)
    with _connect(database_url) as conn:
        _register(conn, "m1")
        _reading(conn, "m1", 1, ts)
        assert conn.execute("SELECT ts FROM readings").fetchone() == (ts,)


def test_rejected_readings_accept_exactly_the_spec_reason_codes(database_url: str) -> None:
    insert = (
        "INSERT INTO rejected_readings (payload, topic, reason, received_at)"
        " VALUES ('\\x00ff', 'meters/x/readings', %s, now())"
    )
    with _connect(database_url) as conn:
        for reason in RejectReason:
            conn.execute(insert, (reason.value,))
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(insert, ("because",))


@pytest.mark.slow
def test_status_and_key_changes_notify_after_commit(database_url: str) -> None:
    with _connect(database_url) as writer, _connect(database_url) as listener:
        _register(writer, "m1")
        listener.execute("LISTEN meterproof_registry")
        with writer.transaction():
            repository.set_status(writer, "m1", MeterStatus.INACTIVE)
            assert list(listener.notifies(timeout=0.2, stop_after=1)) == []  # not before commit
        assert [n.payload for n in listener.notifies(timeout=2, stop_after=1)] == ["m1"]
        writer.execute("UPDATE meters SET owner_wallet = 'w' WHERE meter_id = 'm1'")
        assert list(listener.notifies(timeout=0.2, stop_after=1)) == []  # not a status change
        writer.execute("DELETE FROM meter_keys")
        assert [n.payload for n in listener.notifies(timeout=2, stop_after=1)] == ["m1"]


#: The SHA-256 of every migration as it landed, its first 16 hex digits. `migrate` refuses
#: a database whose applied migration changed on disk, so an edit to a landed file (even
#: to a comment: one slipped into 0017 and was undone) would stop every deployment at its
#: next start. A new migration adds its line here; a landed one never changes its own.
LANDED = {
    "0001_registry": "c6907698b22e880e",
    "0002_readings": "fcf7f0d42a9a6ac2",
    "0003_ledger": "e27365965d504b99",
    "0004_consent": "d3332f7bd6d3cf4a",
    "0005_rollups_retention": "a9182410a3ce149d",
    "0006_evm_transactions": "889c441fcb72a12a",
    "0007_quarter_rollups": "dfeeeea4e618c7fa",
    "0008_providers": "855712c49a75c39a",
    "0010_readings_ts_order": "3ce338d19db63505",
    "0011_reader_pairing": "5958dedd29a20b03",
    "0012_reading_log_hash": "4a79d4ad9be32e47",
    "0013_history_pages": "f3983fad5989436a",
    "0014_history_pages_csv": "a4cf0b391b5b8b6e",
    "0015_rollups_interleaved": "89a0d58a4bafb383",
    "0016_rollups_single": "2421b1d881ed7da7",
    "0017_rollups_short_way_first": "6f14867960b6667d",
    "0018_rollups_left_over_by_share": "96d8ae8061108ec3",
}


def test_no_landed_migration_changes() -> None:
    assert {m.version: m.sha256[:16] for m in load_migrations()} == LANDED
