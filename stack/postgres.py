"""A private PostgreSQL cluster on loopback, driven by initdb and pg_ctl.

Durability stays at the defaults (fsync on) because the benchmarks quote its numbers.
Authentication is `trust`, for 127.0.0.1 over TCP only; the Unix socket is off. initdb
refuses to run as root, so as root the cluster runs as the `postgres` system user.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from pathlib import Path

import psycopg
from psycopg import sql

from meterproof.stack.process import (
    LOOPBACK,
    StackError,
    check_ports_free,
    executable,
    free_port,
    log_tail,
    read_pid,
)

ROLE = "meterproof"
DATABASE = "meterproof"
_SETTINGS = f"""
# meterproof stack: loopback TCP only (no Unix socket); durability at the defaults.
listen_addresses = '{LOOPBACK}'
unix_socket_directories = ''
"""
_HBA = f"host all all {LOOPBACK}/32 trust\n"
_UNPRIVILEGED_USER = "postgres"


class PostgresServer:
    """A cluster in `directory/data` with its log at `directory/postgres.log`.

    `stop()` then `start()` keeps the data; `kill()` is an immediate shutdown (no
    checkpoint, crash recovery on the next start), the closest pg_ctl has to a crash.
    """

    name = "postgres"

    def __init__(
        self,
        *,
        directory: Path,
        port: int | None = None,
        os_user: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.directory = directory
        self.data_dir = directory / "data"
        self.log = directory / "postgres.log"
        self.port = port or free_port()
        self.os_user = os_user or (_UNPRIVILEGED_USER if os.geteuid() == 0 else None)
        self.timeout = timeout

    @property
    def url(self) -> str:
        return self.database_url(DATABASE)

    def database_url(self, database: str) -> str:
        return f"postgresql://{ROLE}@{LOOPBACK}:{self.port}/{database}"

    def start(self) -> float:
        """initdb when the cluster is new, then start it; return the seconds taken."""
        if self.is_running():
            return 0.0
        check_ports_free(self.port)
        began = time.monotonic()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._pg_ctl(
            "start", "-w", "-t", f"{self.timeout:.0f}", "-l", str(self.log), "-o", f"-p {self.port}"
        )
        self._ensure_database()
        return time.monotonic() - began

    def stop(self) -> None:
        """Fast shutdown: disconnect clients, checkpoint, exit."""
        if self.is_running():
            self._pg_ctl("stop", "-w", "-m", "fast", "-t", f"{self.timeout:.0f}")

    def kill(self) -> None:
        """Immediate shutdown: what a crash leaves, minus the stale pid file."""
        if self.is_running():
            self._pg_ctl("stop", "-w", "-m", "immediate", "-t", f"{self.timeout:.0f}")

    def restart(self) -> float:
        self.stop()
        return self.start()

    def is_running(self) -> bool:
        return read_pid(self.data_dir / "postmaster.pid", program="postgres") is not None

    def _initdb(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.os_user is not None:
            account = _account(self.os_user)
            os.chown(self.directory, account.pw_uid, account.pw_gid)
        self._run(
            _pg_bin("initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            ROLE,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        )
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(_SETTINGS)
        (self.data_dir / "pg_hba.conf").write_text(_HBA, encoding="utf-8")

    def _ensure_database(self) -> None:
        """Checked at every start, so a first start that failed after initdb heals."""
        with psycopg.connect(self.database_url("postgres"), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
                return
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))

    def _pg_ctl(self, *args: str) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data_dir), *args)

    def _run(self, *argv: str) -> None:
        account = None if self.os_user is None else _account(self.os_user)
        result = subprocess.run(
            argv,
            cwd=self.directory,
            capture_output=True,
            text=True,
            check=False,
            user=None if account is None else account.pw_uid,
            group=None if account is None else account.pw_gid,
            extra_groups=None if account is None else [],
        )
        if result.returncode != 0:
            command = " ".join([Path(argv[0]).name, *argv[1:]])
            as_user = "" if account is None else f" as {account.pw_name} (it must reach the dir)"
            raise StackError(
                f"{command} failed{as_user} ({result.returncode}): {result.stderr.strip()}\n"
                f"last lines of {self.log}:\n{log_tail(self.log)}"
            )


def _account(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise StackError(
            f"initdb refuses to run as root and there is no {name!r} user to run it as"
        ) from None


def _pg_bin(name: str) -> str:
    """Debian keeps the server tools in /usr/lib/postgresql/<major>/bin, off PATH."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    return executable(name, *versions)
