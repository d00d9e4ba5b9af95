"""Backups as `pg_dump` custom-format archives, restored with `pg_restore` into a fresh
database (docs/scaling.md, "Backup and restore", says why a dump and not a base backup).

A dump is one consistent snapshot (a repeatable-read transaction) taken over an ordinary
connection, while ingest and the bridge keep writing; it restores into any PostgreSQL of
the same or a newer major version. What it holds is the whole database: readings and their
log, rollups, watermarks, the ledger, the registry, and `schema_migrations`, so `db migrate`
on the restored database knows where it stands. Triggers are created after the data is
loaded, so restoring does not roll readings up a second time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from meterproof.durable import fsync_path
from meterproof.errors import (
    ConflictError,
    MeterproofError,
    NotFoundError,
)

#: Anything in the target's own schemas makes it not fresh.
_NOT_EMPTY: Final = """
SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  AND n.nspname NOT LIKE 'pg_temp%%' AND n.nspname NOT LIKE 'pg_toast_temp%%'
"""


class BackupError(MeterproofError):
    """pg_dump or pg_restore failed; nothing was replaced or half-restored."""


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    size_bytes: int
    seconds: float


def backup(database_url: str, out: Path) -> BackupResult:
    """Dump the database to `out` (custom format, compressed). Written beside it first,
    fsynced and renamed when complete, the rename fsynced too, so a file with that name
    is always a whole backup, also after a power cut. A dump that fails or is interrupted
    (Ctrl-C) leaves no partial file behind."""
    partial = out.with_name(f".{out.name}.partial")
    began = time.monotonic()
    try:
        _run("pg_dump", "--format=custom", f"--file={partial}", database_url=database_url)
        fsync_path(partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
    fsync_path(out.parent)
    return BackupResult(out, out.stat().st_size, time.monotonic() - began)


def restore(archive: Path, database_url: str) -> float:
    """Restore `archive` into the empty database at `database_url`, all or nothing (one
    transaction); return the seconds taken. Refuses a database that holds anything."""
    if not archive.is_file():
        raise NotFoundError(f"no backup at {archive}")
    # An unreachable server is the command's failure (`database unreachable: ...`, exit 1,
    # as every `db` command), not a worker's wait for a dependency (75).
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(_NOT_EMPTY).fetchone()
    assert row is not None
    if row[0]:
        raise ConflictError(
            f"the target database holds {row[0]} relations: restore into a fresh one"
            " (createdb, or a new server)"
        )
    began = time.monotonic()
    _run(
        "pg_restore", "--exit-on-error", "--single-transaction", "--no-owner",
        "--no-privileges", str(archive), database_url=database_url,
    )  # fmt: skip
    return time.monotonic() - began


def _run(tool: str, *args: str, database_url: str) -> None:
    """Run `tool` on the database; the URL's password goes in the tool's environment
    (PGPASSWORD), not in its arguments, which any local user can read (`ps`)."""
    executable = shutil.which(tool)
    if executable is None:
        raise NotFoundError(f"{tool} not found: install the PostgreSQL client tools")
    params = conninfo_to_dict(database_url)
    password = params.pop("password", None)
    env = None if password is None else {**os.environ, "PGPASSWORD": str(password)}
    argv = [executable, *args, f"--dbname={make_conninfo('', **params)}"]
    result: subprocess.CompletedProcess[Any] = subprocess.run(
        argv, capture_output=True, text=True, check=False, env=env
    )
    if result.returncode != 0:
        said = [line for line in result.stderr.splitlines() if line.strip()]
        raise BackupError(f"{tool} failed ({result.returncode}): {said[0] if said else '?'}")
