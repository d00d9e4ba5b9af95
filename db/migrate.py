"""Versioned plain-SQL migrations (`db/migrations/NNNN_name.sql`) and their runner.

Each file is applied in its own transaction and recorded in `schema_migrations` with its
SHA-256, so a re-run is a no-op and an edited, renamed or deleted applied file is an
error instead of a silent divergence between databases; so is a database that a newer
meterproof migrated past this one's files. Runners started at the same time
(several workers, `stack up`) queue on a transaction-scoped advisory lock, and each
re-reads what is applied after taking it.

The `db` command (`db/cli.py`) runs it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import psycopg
from psycopg.rows import tuple_row

from meterproof.errors import MeterproofError, first_line

#: Any constant works, as long as nothing else takes the same advisory lock.
_LOCK_KEY: Final = 7302166411205843184
_FILE_RE: Final = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(MeterproofError):
    """The migration files and the database disagree, or a migration failed: that one is
    not applied (the ones before it in the same run are)."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str  #: the file name without `.sql`, e.g. `0001_registry`
    sql: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql).hexdigest()


def load_migrations() -> list[Migration]:
    """The packaged files in order; a stray name or a reused number is an error."""
    found: dict[str, Migration] = {}
    for entry in resources.files("meterproof.db").joinpath("migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_RE.fullmatch(entry.name)
        if match is None:
            raise MigrationError(f"{entry.name}: migration files are named NNNN_lower_case.sql")
        number = match.group(1)
        if number in found:
            raise MigrationError(f"{entry.name} reuses number {number} of {found[number].version}")
        found[number] = Migration(entry.name.removesuffix(".sql"), entry.read_bytes())
    return [found[number] for number in sorted(found)]


def migrate(database_url: str) -> list[str]:
    """Apply the pending migrations; return the versions this call applied (in order).

    Also makes sure the readings partitions for the coming week exist, so every start
    of the stack leaves a week of headroom.
    """
    migrations = load_migrations()
    applied_now: list[str] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        while (version := _apply_next(conn, migrations)) is not None:
            applied_now.append(version)
        ensure_partitions(conn)
    return applied_now


def _apply_next(conn: psycopg.Connection[Any], migrations: list[Migration]) -> str | None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now(),"
            " sha256 text NOT NULL)"
        )
        with conn.cursor(row_factory=tuple_row) as cur:
            rows = cur.execute("SELECT version, sha256 FROM schema_migrations").fetchall()
        applied = {str(version): str(digest) for version, digest in rows}
        _check_applied(applied, migrations)
        pending = [m for m in migrations if m.version not in applied]
        if not pending:
            return None
        migration = pending[0]
        try:
            conn.execute(migration.sql)
        except psycopg.Error as exc:
            raise MigrationError(f"{migration.version}.sql failed: {first_line(exc)}") from exc
        conn.execute(
            "INSERT INTO schema_migrations (version, sha256) VALUES (%s, %s)",
            (migration.version, migration.sha256),
        )
        return migration.version


def _check_applied(applied: dict[str, str], migrations: list[Migration]) -> None:
    files = {m.version: m for m in migrations}
    newest_file = max(files, default="")
    for version, digest in sorted(applied.items()):
        migration = files.get(version)
        if migration is None and version[:4] > newest_file[:4]:
            raise MigrationError(
                f"the database has migration {version}, newer than this meterproof's newest"
                f" ({newest_file}): run the meterproof that applied it, or a newer one"
            )
        if migration is None:
            raise MigrationError(
                f"applied migration {version} has no file (renamed or deleted?); "
                "never change an applied migration, add a new one"
            )
        if migration.sha256 != digest:
            raise MigrationError(
                f"{version}.sql changed after it was applied (sha256 {digest[:12]}… in the "
                f"database, {migration.sha256[:12]}… on disk); add a new migration instead"
            )
    if applied:
        newest = max(applied)
        skipped = [m.version for m in migrations if m.version not in applied and m.version < newest]
        if skipped:
            raise MigrationError(f"{skipped[0]} is older than the applied {newest}: renumber it")


def ensure_partitions(conn: psycopg.Connection[Any], *, days_ahead: int = 7) -> int:
    """Create the missing daily readings partitions from yesterday to `days_ahead` days out;
    return how many were created. Safe to call concurrently; a no-op under TimescaleDB."""
    if not 0 <= days_ahead <= 366:
        raise ValueError(f"days_ahead must be 0 to 366, not {days_ahead}")
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(
            "SELECT meterproof_ensure_partitions("
            " now() - interval '1 day', now() + make_interval(days => %s))",
            (days_ahead,),
        ).fetchone()
    assert row is not None
    created = row[0]
    assert isinstance(created, int)
    return created
