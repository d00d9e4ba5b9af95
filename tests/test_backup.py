"""`meterproof db backup` and `db restore`: a database with anchored, retired and
unanchored readings, dumped while it is in use and restored into a fresh PostgreSQL
server of its own, where `meterproof ledger verify` says OK and every table is as it was."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from bridge_harness import T0, make_fleet, query
from click.testing import CliRunner
from psycopg import sql
from test_retention import anchor, run_prune

from meterproof.bridge.cli import ledger
from meterproof.bridge.oracle import Oracle, load_oracle
from meterproof.certs.layout import PkiLayout
from meterproof.db.backup import backup
from meterproof.db.cli import db
from meterproof.stack.postgres import PostgresServer

TABLES = (
    "readings", "reading_log", "meter_rollups", "reading_watermarks", "retired_batches",
    "retired_mint_state", "ledger_entries", "ledger_mints", "bridge_batches", "meters",
    "schema_migrations",
)  # fmt: skip


@pytest.fixture
def oracle(pki: PkiLayout) -> Oracle:
    return load_oracle(pki.oracle_key)


@pytest.fixture
def fresh_server() -> Iterator[PostgresServer]:
    """A new, empty PostgreSQL cluster, removed afterwards (also when it fails to start)."""
    server = PostgresServer(directory=Path(tempfile.mkdtemp(prefix="meterproof-pg-restore-")))
    try:
        server.start()
        yield server
    finally:
        server.remove()


def contents(database_url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the tables that matter, in a stable order."""
    return {t: sorted(query(database_url, f"SELECT * FROM {t}"), key=repr) for t in TABLES}


@pytest.mark.slow
def test_a_backup_restored_into_a_fresh_server_verifies_and_holds_everything(
    database_url: str,
    make_meter_id: Callable[[], str],
    oracle: Oracle,
    pki: PkiLayout,
    fresh_server: PostgresServer,
    tmp_path: Path,
) -> None:
    fleet, (a, b) = make_fleet(database_url, make_meter_id, ["w-a", None])
    q = 900_000
    fleet.store([(m, k + 1, T0 + k * q + 1, k, 10 * k) for k in range(8) for m in (a, b)])
    anchor(database_url, oracle, T0 + 8 * q + 1000)
    run_prune(database_url, T0 + 2 * q)  # two batches retired
    fleet.store([(a, 20, T0 + 9 * q, 20, 200)])  # not anchored yet
    archive = tmp_path / "meterproof.dump"
    runner = CliRunner()

    made = runner.invoke(db, ["backup", "--database-url", database_url, "--out", str(archive)])
    assert made.exit_code == 0, made.output
    assert made.output.startswith(f"backup written: {archive} (")
    assert archive.stat().st_size > 0
    assert not list(tmp_path.glob(".*.partial"))

    restored = runner.invoke(db, ["restore", str(archive), "--database-url", fresh_server.url])
    assert restored.exit_code == 0, restored.output
    assert restored.output.startswith(f"restored {archive} in ")
    assert contents(fresh_server.url) == contents(database_url)
    assert query(fresh_server.url, "SELECT count(*) FROM retired_batches") == [(2,)]

    verified = runner.invoke(
        ledger, ["verify", "--database-url", fresh_server.url, "--oracle-pub", str(pki.oracle_pub)]
    )
    assert verified.exit_code == 0, verified.output
    assert verified.output.startswith("OK 8 entries, 12 anchored readings")

    # the restored database takes readings and migrations as the original did
    migrated = runner.invoke(db, ["migrate", "--database-url", fresh_server.url])
    assert migrated.output.startswith("up to date")
    with psycopg.connect(fresh_server.url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO reading_log (meter_id, seq, reading_hash, ts, import_wh, export_wh)"
            " SELECT meter_id, 21, sha256('x'), ts + interval '1 minute', import_wh + 1, export_wh"
            " FROM reading_log WHERE meter_id = %s AND seq = 20",
            (a,),
        )
        rolled = conn.execute(
            "SELECT sum(readings), sum(import_wh) FROM meter_rollups WHERE meter_id = %s"
            " AND width = '1d'",
            (a,),
        ).fetchone()
    assert rolled == (10, 21)  # 9 readings of meter a, then seq 21: imports 0..20, 21


def test_restore_refuses_a_database_that_is_not_empty_or_a_missing_archive(
    database_url: str, tmp_path: Path
) -> None:
    runner = CliRunner()
    archive = tmp_path / "x.dump"
    missing = runner.invoke(db, ["restore", str(archive), "--database-url", database_url])
    assert missing.exit_code == 1
    assert missing.output == f"Error: no backup at {archive}\n"
    archive.write_bytes(b"not a dump")
    busy = runner.invoke(db, ["restore", str(archive), "--database-url", database_url])
    assert busy.exit_code == 1
    assert busy.output.startswith("Error: the target database holds ")
    assert "restore into a fresh one" in busy.output


def test_a_failed_backup_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "b.dump"
    result = CliRunner().invoke(
        db, ["backup", "--database-url", "postgresql://nobody@127.0.0.1:1/x", "--out", str(out)]
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: pg_dump failed (1): ")
    assert list(tmp_path.iterdir()) == []


def test_a_restore_into_an_unreachable_server_is_exit_1_as_every_db_command(
    tmp_path: Path,
) -> None:
    """`db restore` answered an unreachable server with 75 (a worker's "try later"),
    where the README and the other `db` commands give 1."""
    archive = tmp_path / "b.dump"
    archive.write_bytes(b"a dump")
    result = CliRunner().invoke(
        db, ["restore", str(archive), "--database-url", "postgresql://nobody@127.0.0.1:1/x"]
    )
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: database unreachable: ")
    assert result.output.count("\n") == 1


def test_the_database_password_is_not_in_the_tools_arguments(
    database_url: str, postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any local user reads a process's arguments (`ps`): the password goes to pg_dump
    and pg_restore in their environment. A shim in front of each records what it got."""
    shims = tmp_path / "bin"
    shims.mkdir()
    for tool in ("pg_dump", "pg_restore"):
        real = shutil.which(tool)
        assert real is not None
        shim = shims / tool
        shim.write_text(
            f'#!/bin/sh\necho "$*" >> {tmp_path}/argv\necho "$PGPASSWORD" >> {tmp_path}/env\n'
            f'exec {real} "$@"\n'
        )
        shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{os.environ['PATH']}")
    target = f"restore_{uuid.uuid4().hex}"
    with psycopg.connect(postgres.database_url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target)))
    archive = tmp_path / "p.dump"
    runner = CliRunner()
    try:
        for args, url in (
            (["backup", "--out", str(archive)], database_url),
            (["restore", str(archive)], postgres.database_url(target)),
        ):
            with_password = url.replace("meterproof@", "meterproof:s3cret-pw@", 1)
            assert with_password != url
            done = runner.invoke(db, [*args, "--database-url", with_password])
            assert done.exit_code == 0, done.output
    finally:
        with psycopg.connect(postgres.database_url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(target)))
    argv = (tmp_path / "argv").read_text().splitlines()
    assert len(argv) == 2
    assert not [line for line in argv if "s3cret-pw" in line]
    assert (tmp_path / "env").read_text() == "s3cret-pw\n" * 2


def test_an_interrupted_backup_leaves_no_partial_file(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while pg_dump runs: a pg_dump shim writes the dump, then sends SIGINT to
    us and exits, as a terminal's Ctrl-C ends both, so the KeyboardInterrupt arrives
    while we wait for the tool. It goes on up, and the `.partial` file does not stay."""
    shims = tmp_path / "bin"
    shims.mkdir()
    real = shutil.which("pg_dump")
    assert real is not None
    shim = shims / "pg_dump"
    shim.write_text(f'#!/bin/sh\n{real} "$@" || exit\nkill -INT $PPID\nexit 130\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "dumps" / "b.dump"
    out.parent.mkdir()
    # Python's own Ctrl-C handler: an earlier test of this process may have left another
    # (a supervisor's, a server's), which would turn the SIGINT into nothing.
    kept = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            backup(database_url, out)
    finally:
        signal.signal(signal.SIGINT, kept)
    assert list(out.parent.iterdir()) == []


def test_a_finished_backup_is_on_the_disk_before_it_is_reported(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut after `backup` returned must find the whole archive under its name: its
    data is flushed before the rename, the folder's entry after it (the real fsyncs,
    recorded on the way)."""
    synced: list[str] = []
    fsync = os.fsync

    def recorded(fd: int) -> None:
        synced.append(str(Path(f"/proc/self/fd/{fd}").readlink()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    out = tmp_path / "b.dump"
    done = backup(database_url, out)
    assert synced == [str(tmp_path / ".b.dump.partial"), str(tmp_path)]
    assert done.size_bytes == out.stat().st_size > 0
