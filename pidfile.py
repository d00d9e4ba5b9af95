"""Pid files: which process a server's pid file names, if it still runs.

A pid file outlives its process (a crash, a kill -9, a reboot), and its number is handed
out again later, to anything: after a reboot perhaps to the system's own Mosquitto or
PostgreSQL, which a check of the program's name cannot tell from ours. A process that
started after the file was last written is not the one the file names, so it is ignored.
Used by the stack's runners (start, status, stop) and by `mosquitto.admin`'s SIGHUP.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Final

#: How much later than its pid file's last write a process may seem to have started and
#: still be the one it names: the two clocks compared are read apart (the file's mtime
#: from the wall clock when written, the start from the boot clock now), so a wall clock
#: stepped back between the two moves them apart. A number is handed out again only
#: after all others (32,768 by default) or a reboot, never within seconds.
_CLOCK_SLACK_S: Final = 5.0


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; reaps it when it is our exited child."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not ours: ask the kernel below
    else:
        return done == 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_dead_zombie(pid)


def _is_dead_zombie(pid: int) -> bool:
    """An exited process nobody reaped (this machine's init does not reap orphans).

    Only once its last thread is gone: a leader turns zombie while threads that still
    hold its sockets are exiting.
    """
    try:
        stat = _stat_fields(pid)
        threads = sum(1 for _ in Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    return stat[0] == "Z" and threads == 1


def read_pid(pid_file: Path, *, program: str) -> int | None:
    """The running pid recorded in `pid_file`, if it still belongs to `program` and
    started before the file was last written.

    Not for a pid just spawned: the kernel resumes the parent before it renames the child.
    """
    try:
        pid = int(pid_file.read_text(encoding="ascii").split()[0])
        written = pid_file.stat().st_mtime
    except (FileNotFoundError, IndexError, ValueError):
        return None
    if not pid_alive(pid) or _started_after(pid, written):
        return None
    try:
        comm = Path(f"/proc/{pid}/comm").read_text(encoding="utf-8").strip()
    except OSError:
        return pid
    return pid if program.startswith(comm) else None


def _started_after(pid: int, written: float) -> bool:
    """Whether `pid`'s process started after `written` (a wall-clock time): a later
    process that was given the number again."""
    try:
        ticks = int(_stat_fields(pid)[19])  # field 22, starttime: clock ticks after boot
    except (OSError, IndexError, ValueError):
        return False
    booted = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    started = booted + ticks / os.sysconf("SC_CLK_TCK")
    return started > written + _CLOCK_SLACK_S


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from its third field (the state) on: the second, the program's
    name in parentheses, may itself hold spaces and parentheses."""
    return Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rpartition(")")[2].split()
