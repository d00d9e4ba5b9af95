"""Pid files left behind: a number handed out again, to the same program, is not ours.

The reuse itself cannot be waited for (it takes every other pid, or a reboot), so each
test writes the file as a crash would have left it: naming a process that started after
the file's last write."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meterproof.pidfile import read_pid
from meterproof.stack.redis import RedisServer

#: Long enough before any process of the test started.
_AN_HOUR_AGO = time.time() - 3600


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_pid_file_names_its_process_until_a_later_one_has_the_number(
    sleeper: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    pid_file = tmp_path / "sleep.pid"
    pid_file.write_text(f"{sleeper.pid}\n", encoding="ascii")
    assert read_pid(pid_file, program="sleep") == sleeper.pid
    assert read_pid(pid_file, program="redis-server") is None  # another program
    os.utime(pid_file, (_AN_HOUR_AGO, _AN_HOUR_AGO))  # written before this process started
    assert read_pid(pid_file, program="sleep") is None


def test_a_stale_pid_file_does_not_stop_another_server_of_the_same_program(
    tmp_path: Path,
) -> None:
    """What a reboot or a pid wrap could do: the file of a Redis that crashed an hour ago
    names a Redis running now. `stop` of the crashed one must not stop that one, and its
    `start` must start it, not take the other for it."""
    running = RedisServer(directory=tmp_path / "running")
    crashed = RedisServer(directory=tmp_path / "crashed")
    running.start()
    try:
        pid = running.pid()
        assert pid is not None
        crashed.directory.mkdir()
        crashed.pid_file.write_text(f"{pid}\n", encoding="ascii")
        os.utime(crashed.pid_file, (_AN_HOUR_AGO, _AN_HOUR_AGO))
        assert not crashed.is_running()
        crashed.stop()
        assert running.pid() == pid
        assert running.is_running()
        crashed.start()
        assert crashed.pid() not in {None, pid}
        crashed.stop()
        assert running.pid() == pid
    finally:
        running.stop()
