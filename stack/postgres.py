"""A private PostgreSQL cluster on loopback, driven by initdb and pg_ctl.

Durability stays at the defaults (fsync on) because the benchmarks quote its numbers.
Authentication is `trust`, for 127.0.0.1 over TCP only; the Unix socket is off.

initdb refuses to run as root, so as root the cluster runs as the `postgres` system
user, which must be able to enter every folder above its data. A clone in `/root` or
under a `mktemp -d` folder (both 0700) is out of its reach, and opening those folders
up would be a change to the user's machine nobody asked for. So a new cluster goes
where it is reachable: in the run dir when `postgres` can enter it, else in that user's
home (`~postgres/meterproof/<run dir path>-<hash>`, which it owns), with the run dir's
`postgres` entry a symlink to it. The link is the record: `status` and `down` follow
it, as a person does, and a cluster never moves once made. Deleting the run dir drops
the record, so the next cluster made for the same path starts afresh instead of
reviving the old data; `remove()` deletes a cluster wherever it lives. A location that
fits neither is refused before initdb, in one line that says what to change.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import psycopg
from psycopg import sql

from meterproof.pidfile import read_pid
from meterproof.stack.process import (
    LOOPBACK,
    StackError,
    check_ports_free,
    executable,
    free_port,
    log_hint,
)

ROLE = "meterproof"
DATABASE = "meterproof"
#: How long a connection may take to send its startup packet and authenticate (the
#: default is 60 s). A shutting-down server waits for the children that answer
#: connections queued while it was paused, and those wait for the client this long: a
#: client that gave up without closing its socket (psycopg leaves a timed-out attempt open
#: until garbage collection; `db/connect.py`) held a Patroni demotion for 48 s
#: (docs/reliability.md).
AUTHENTICATION_TIMEOUT: Final = "5s"
_SETTINGS = f"""
# meterproof stack: loopback TCP only (no Unix socket); durability at the defaults.
listen_addresses = '{LOOPBACK}'
unix_socket_directories = ''
# A client that has not authenticated by then is not going to (stack/postgres.py).
authentication_timeout = '{AUTHENTICATION_TIMEOUT}'
"""
_HBA = f"host all all {LOOPBACK}/32 trust\n"
_UNPRIVILEGED_USER = "postgres"
#: Under the unprivileged user's home: clusters whose run dir that user cannot enter.
_ELSEWHERE = "meterproof"


class PostgresServer:
    """A cluster in `directory/data` with its log at `directory/postgres.log`;
    `directory` may be a symlink to where the cluster really lives (see the module).

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
        self.directory = directory.absolute()
        self.data_dir = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.port = port or free_port()
        self.os_user = os_user or default_os_user()
        self.timeout = timeout

    @property
    def url(self) -> str:
        return self.database_url(DATABASE)

    def database_url(self, database: str) -> str:
        return f"postgresql://{ROLE}@{LOOPBACK}:{self.port}/{database}"

    @property
    def home(self) -> Path:
        """Where the cluster's files really are: `directory`, or where its link points."""
        return self.directory.resolve()

    def start(self) -> float:
        """initdb when the cluster is new, then start it; return the seconds taken. A
        start that fails (or is interrupted) after the postmaster was spawned, as when
        `pg_ctl -w` gives up waiting or the database cannot be made, stops it again, so a
        failed start leaves nothing running."""
        if self.is_running():
            return 0.0
        check_ports_free(self.port)
        began = time.monotonic()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        try:
            self._pg_ctl(
                "start", "-w", "-t", f"{self.timeout:.0f}", "-l", str(self.home / self.log.name),
                "-o", f"-p {self.port}",
            )  # fmt: skip
            self._ensure_database()
        except BaseException:
            with contextlib.suppress(StackError):  # the start's error is the one to raise
                self.stop()
            raise
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

    def remove(self) -> None:
        """Stop, then delete the cluster and its log, wherever they live."""
        self.stop()
        if self.directory.is_symlink():
            shutil.rmtree(self.home, ignore_errors=True)
            self.directory.unlink()
        else:
            shutil.rmtree(self.directory, ignore_errors=True)

    def is_running(self) -> bool:
        return read_pid(self.data_dir / "postmaster.pid", program="postgres") is not None

    def _initdb(self) -> None:
        place_cluster(self.directory, self.os_user)
        self._run(
            pg_bin("initdb"),
            "-D",
            str(self.home / "data"),
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
        ensure_database(self.database_url("postgres"))

    def _pg_ctl(self, *args: str) -> None:
        self._run(pg_bin("pg_ctl"), "-D", str(self.home / "data"), *args)

    def _run(self, *argv: str) -> None:
        account = None if self.os_user is None else os_account(self.os_user)
        result = _run_as(account, argv, cwd=self.home)
        if result.returncode != 0:
            as_user = "" if account is None else f" as {account.pw_name}"
            said = [line.strip() for line in result.stderr.splitlines() if line.strip()]
            raise StackError(
                f"{Path(argv[0]).name} failed{as_user} ({result.returncode}): "
                f"{said[0] if said else 'no message'}; {log_hint(self.log)}"
            )


def ensure_database(maintenance_url: str) -> None:
    """Create meterproof's database through `maintenance_url` unless it exists."""
    with psycopg.connect(maintenance_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
            return
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))


def default_os_user() -> str | None:
    """The user clusters run as: `postgres` as root (initdb refuses root), else ourselves."""
    return _UNPRIVILEGED_USER if os.geteuid() == 0 else None


def place_cluster(directory: Path, os_user: str | None) -> None:
    """Make the folder a new cluster goes in, owned by the user it runs as: `directory`
    itself when that user can enter its parent, else a link to a folder in its home (see
    the module)."""
    if os_user is None:
        directory.mkdir(parents=True, exist_ok=True)
        return
    account = os_account(os_user)
    if directory.is_symlink():
        _make_owned(directory.resolve(), account)  # placed before; initdb never finished
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    if _can_enter(account, directory.parent):
        _make_owned(directory, account)
    else:
        _link_elsewhere(directory, account)


def _link_elsewhere(directory: Path, account: pwd.struct_passwd) -> None:
    """Point `directory` at a fresh folder in the user's home (see the module)."""
    elsewhere = Path(account.pw_dir) / _ELSEWHERE
    if not _can_enter(account, Path(account.pw_dir)):
        raise StackError(
            f"PostgreSQL runs as {account.pw_name!r}, which can enter neither "
            f"{directory.parent} nor its home {account.pw_dir}: "
            "give --run-dir a folder it can reach (for example under /var/tmp)"
        )
    target = elsewhere / _folder_name(directory)
    if read_pid(target / "data" / "postmaster.pid", program="postgres") is not None:
        raise StackError(
            f"a cluster made for {directory} still runs from {target}, but the run "
            f"dir lost its link: stop it (pg_ctl -D {target}/data stop) and start again"
        )
    shutil.rmtree(target, ignore_errors=True)  # the run dir that made it was deleted
    if directory.exists():
        shutil.rmtree(directory)  # holds no cluster: initdb was never reached
    _make_owned(elsewhere, account)
    _make_owned(target, account)
    directory.symlink_to(target, target_is_directory=True)


def _run_as(
    account: pwd.struct_passwd | None, argv: Sequence[str], *, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `argv` as `account` (with its own group only), or as we are when None."""
    return subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        user=None if account is None else account.pw_uid,
        group=None if account is None else account.pw_gid,
        extra_groups=None if account is None else [],
    )


def _can_enter(account: pwd.struct_passwd, folder: Path) -> bool:
    """Asked of the system as that user, so ACLs and every folder above count."""
    probe = executable("test", Path("/usr/bin"), Path("/bin"))
    return _run_as(account, [probe, "-x", str(folder)]).returncode == 0


def _make_owned(folder: Path, account: pwd.struct_passwd) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(folder, account.pw_uid, account.pw_gid)


def _folder_name(directory: Path) -> str:
    """Readable, and one per run dir path: the path's tail plus a hash of all of it."""
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9._]+", "-", str(directory)).strip("-")[-48:]
    return f"{readable}-{digest}"


def os_account(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise StackError(
            f"initdb refuses to run as root and there is no {name!r} user to run it as"
        ) from None


def pg_bin(name: str) -> str:
    """Debian keeps the server tools in /usr/lib/postgresql/<major>/bin, off PATH."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    return executable(name, *versions)
