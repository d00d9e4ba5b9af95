"""Process plumbing shared by the server runners.

Servers are spawned detached (own session, output to a log file, pid in a file) so that
`meterproof stack up` can exit while they run and `stack down` can stop them later from
another process. The process that spawned a server also reaps it, so tests leave no
zombies; a zombie left to an init that does not reap counts as stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meterproof.errors import MeterproofError
from meterproof.pidfile import pid_alive, read_pid

LOOPBACK = "127.0.0.1"
_POLL_S = 0.02


class StackError(MeterproofError):
    """A server did not start or stop as asked: one line that names the log to read."""


#: Where `free_port` draws from: above the well-known services, below the kernel's range
#: for outgoing connections.
_PORT_FLOOR = 20_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: Not `random`'s shared generator: a test that seeds it (hypothesis does) would make two
#: test processes draw the same ports.
_PORTS = random.SystemRandom()
#: The ports drawn or claimed lately, one file for the machine (not per TMPDIR: a process
#: given its own TMPDIR must still see the others' draws), and how long a draw holds.
_CLAIMS = Path("/tmp/meterproof-claimed-ports.json")  # noqa: S108 - shared on purpose
CLAIM_S = 300.0
#: The claims of this process when the file cannot be used.
_claims_here: dict[int, float] = {}


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on now, for a server about to start there.

    Outgoing connections take their local ports from the kernel's ephemeral range, so a
    port handed out from it can be taken by a connection before the server binds it (a
    port taken before its server started has been seen on these shared machines).
    Ports are drawn below that range instead, and claimed (`claim_port`), so that another
    process drawing in the seconds before the server binds cannot get the same one (a
    port drawn in one test process and bound by another's server failed a clean-clone
    run). If the range leaves no room below it, the kernel picks.
    """
    try:
        ceiling = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ceiling = 0
    if ceiling - _PORT_FLOOR >= 1_000:
        for _ in range(100):
            port = _PORTS.randrange(_PORT_FLOOR, ceiling)
            if claim_port(port, host):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def claim_port(port: int, host: str = LOOPBACK) -> bool:
    """Whether `port` is free and no process on this machine drew or claimed it in the last
    CLAIM_S seconds; if so it is now claimed. For ports a caller derives (a second broker
    on the first's port + 10) as much as for drawn ones: only servers that start within
    CLAIM_S of the claim are protected, which all of ours do."""
    with _claims() as claims:
        if port in claims or not port_is_free(port, host):
            return False
        claims[port] = time.time() + CLAIM_S
        return True


@contextmanager
def _claims() -> Iterator[dict[int, float]]:
    """The unexpired claims, to read and add to, under an exclusive lock of the file; this
    process's own when the file cannot be used (another user's, a read-only /tmp, a
    symbolic link: never followed, where anyone may plant one)."""
    now = time.time()
    try:
        fd = os.open(_CLAIMS, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError:
        for port in [port for port, until in _claims_here.items() if until <= now]:
            del _claims_here[port]
        yield _claims_here
        return
    with os.fdopen(fd, "r+", encoding="utf-8") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            raw = json.loads(file.read() or "{}")
            claims = {int(port): float(until) for port, until in raw.items()}
        except (ValueError, TypeError, AttributeError):
            claims = {}  # torn or foreign content: start again rather than refuse to draw
        claims = {port: until for port, until in claims.items() if until > now}
        yield claims
        file.seek(0)
        file.truncate()
        file.write(json.dumps(claims))


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server could listen there now (TIME_WAIT leftovers do not count); never
    for a number that is no port (a derived one, such as a broker's port + 10)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except (OSError, OverflowError):
            return False
        return True


def port_accepts(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def check_ports_free(*ports: int) -> None:
    """Refuse early: a probe could otherwise mistake another server on the port for ours."""
    for port in ports:
        if not port_is_free(port):
            raise StackError(f"port {port} on {LOOPBACK} is already in use")


_ERROR_LINE = re.compile(r"\b(error|fatal|panic)\b", re.IGNORECASE)


def log_hint(path: Path) -> str:
    """Where the log is and its line most likely to be the cause, so an error stays one
    line: the first error among the last few (a server's cause comes before the
    follow-up lines, as OpenSSL's stack after Mosquitto's), else the last line."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"no log at {path}"
    tail = [line.strip() for line in text.splitlines() if line.strip()][-5:]
    if not tail:
        return f"{path} is empty"
    cause = next((line for line in tail if _ERROR_LINE.search(line)), tail[-1])
    return f"{path} says: {cause}"


def wait_for(
    ready: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    log: Path,
    alive: Callable[[], bool] = lambda: True,
) -> float:
    """Poll until `ready()`; return the seconds it took. Fails fast if the server died."""
    start = time.monotonic()
    while True:
        if ready():
            return time.monotonic() - start
        if not alive():
            raise StackError(f"{what}: the process exited; {log_hint(log)}")
        if time.monotonic() - start > timeout:
            raise StackError(f"{what}: not ready after {timeout:.0f} s; {log_hint(log)}")
        time.sleep(_POLL_S)


def executable(name: str, *extra_dirs: Path) -> str:
    """Find a server binary on PATH, then in `extra_dirs` (Debian keeps pg_ctl off PATH)."""
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(map(str, extra_dirs)))
    if path is None:
        raise StackError(f"{name} not found on PATH; `make system-packages` installs it")
    return path


def spawn(argv: Sequence[str], *, log: Path, pid_file: Path) -> int:
    """Start `argv` in a new session with stdout and stderr appended to `log`.

    posix_spawn rather than Popen: a server must outlive `stack up`, and a Popen object
    dropped while its child runs is reported as a leak.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        pid = os.posix_spawn(
            argv[0],
            list(argv),
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(fd)
    pid_file.write_text(f"{pid}\n", encoding="utf-8")
    return pid


def stop_process(pid: int, *, name: str, sig: signal.Signals, timeout: float, log: Path) -> None:
    """Signal the server's process group and wait for the leader to exit."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            while pid_alive(pid):
                time.sleep(_POLL_S)
            raise StackError(
                f"{name} ignored {sig.name} for {timeout:.0f} s and was killed; {log_hint(log)}"
            )
        time.sleep(_POLL_S)


def end_child(child: subprocess.Popen[Any], sig: signal.Signals, *, timeout: float) -> None:
    """Signal a child of ours that still runs and wait for it; kill it after `timeout`."""
    if child.poll() is None:
        child.send_signal(sig)
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


class SpawnedServer(ABC):
    """A server we spawn ourselves (Redis, Mosquitto): found again by its pid file, stopped
    by signalling its process group."""

    name: str
    #: The executable's name as /proc/<pid>/comm shows it.
    program: str

    def __init__(self, *, log: Path, pid_file: Path, timeout: float) -> None:
        self.log = log
        self.pid_file = pid_file
        self.timeout = timeout

    @abstractmethod
    def start(self) -> float:
        """Start unless running; return the seconds until ready (0 when already running)."""

    def stop(self) -> None:
        """SIGTERM, the server's own clean shutdown."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: no shutdown work at all, as in a crash."""
        self._signal(signal.SIGKILL)

    def restart(self) -> float:
        self.stop()
        return self.start()

    def is_running(self) -> bool:
        return self.pid() is not None

    def pid(self) -> int | None:
        return read_pid(self.pid_file, program=self.program)

    def _launch(self, argv: Sequence[str], *, ready: Callable[[], bool], what: str) -> float:
        """Spawn and wait until ready; a server that never got ready (or whose wait was
        interrupted) is stopped again, so a failed start leaves nothing running."""
        pid = spawn(argv, log=self.log, pid_file=self.pid_file)
        try:
            return wait_for(
                ready, what=what, timeout=self.timeout, log=self.log, alive=lambda: pid_alive(pid)
            )
        except BaseException:
            with contextlib.suppress(StackError):  # SIGKILLed then: the start's error is raised
                stop_process(
                    pid, name=self.name, sig=signal.SIGTERM, timeout=self.timeout, log=self.log
                )
            self.pid_file.unlink(missing_ok=True)
            raise

    def send(self, sig: signal.Signals) -> None:
        """`sig` to the running server, which goes on running (unlike `stop` and `kill`):
        a reload, a pause, a resume."""
        pid = self.pid()
        if pid is None:
            raise StackError(f"{self.name}: {self.program} is not running (no live pid in"
                             f" {self.pid_file})")  # fmt: skip
        os.kill(pid, sig)

    def _signal(self, sig: signal.Signals) -> None:
        pid = self.pid()
        if pid is not None:
            stop_process(pid, name=self.name, sig=sig, timeout=self.timeout, log=self.log)
        self.pid_file.unlink(missing_ok=True)
