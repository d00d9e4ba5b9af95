"""Registration of a fleet: certificates + registry rows for N meters, end to end.

Measured twice on a private PKI and database. As an operator runs it: the two commands
(`certs issue-bulk`, then `meters register --bulk` on the CSV it wrote), each a fresh
process, so interpreter start and imports are in the figure. In-process: the same library
calls without process start, which shows how much of the total is the work itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg

from meterproof.certs import issue_bulk
from meterproof.certs.bootstrap import init_pki
from meterproof.certs.bulk import new_meter_ids, write_bulk_csv
from meterproof.certs.layout import PkiLayout
from meterproof.db.migrate import migrate
from meterproof.registry import repository, sources
from meterproof.registry.model import MeterStatus, SecurityLevel
from meterproof.stack.postgres import PostgresServer


@dataclass(frozen=True, slots=True)
class RegistrationResult:
    meters: int
    commands_issue_s: float
    commands_register_s: float
    commands_total_s: float
    inprocess_issue_s: float
    inprocess_csv_s: float
    inprocess_register_s: float
    inprocess_total_s: float
    registered: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _command(argv: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-P", "-m", "meterproof", *argv],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "METERPROOF_LOG_LEVEL": "WARNING"},
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"meterproof {' '.join(argv[:2])} failed: {done.stderr.strip()}")
    return elapsed


def _count(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM meters").fetchone()
    return int(row[0]) if row else 0


def run_registration(*, run_dir: Path, meters: int = 1_000) -> RegistrationResult:
    pki = PkiLayout(run_dir / "pki")
    init_pki(pki)
    server = PostgresServer(directory=run_dir / "postgres")
    server.start()
    try:
        migrate(server.url)
        csv_path = run_dir / "fleet.csv"
        issue_s = _command(
            ["certs", "--pki-root", str(pki.root), "issue-bulk", "--count", str(meters),
             "--prefix", "cmd-", "--out", str(csv_path)]
        )  # fmt: skip
        register_s = _command(
            ["meters", "register", "--bulk", str(csv_path), "--database-url", server.url]
        )
        started = time.perf_counter()
        issued = issue_bulk(pki, new_meter_ids(meters, "lib-"))
        issued_at = time.perf_counter()
        lib_csv = run_dir / "fleet-lib.csv"
        write_bulk_csv(issued, lib_csv)
        rows = sources.read_bulk(
            lib_csv, status=MeterStatus.ACTIVE, security_level=SecurityLevel.STANDARD
        )
        csv_at = time.perf_counter()
        with psycopg.connect(server.url, autocommit=True) as conn:
            repository.register(conn, rows)
        done_at = time.perf_counter()
        registered = _count(server.url)
    finally:
        server.stop()
    if registered != 2 * meters:
        raise RuntimeError(f"{registered} meters registered, expected {2 * meters}")
    return RegistrationResult(
        meters=meters,
        commands_issue_s=issue_s,
        commands_register_s=register_s,
        commands_total_s=issue_s + register_s,
        inprocess_issue_s=issued_at - started,
        inprocess_csv_s=csv_at - issued_at,
        inprocess_register_s=done_at - csv_at,
        inprocess_total_s=done_at - started,
        registered=registered,
    )
