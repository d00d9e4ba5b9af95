"""Log lines a person can read on a terminal, JSON lines for everything else."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = (
    "from meterproof.cli.logs import configure_logging; import structlog; "
    "configure_logging(); structlog.get_logger('t').warning('batch_retry', size=3)"
)


def test_json_lines_when_stderr_is_not_a_terminal() -> None:
    done = subprocess.run(
        [sys.executable, "-P", "-c", PROBE], capture_output=True, check=True, timeout=30
    )
    line = json.loads(done.stderr)
    assert (line["event"], line["level"], line["size"]) == ("batch_retry", "warning", 3)


def test_a_librarys_logging_lines_are_json_too() -> None:
    """psycopg's pool, uvicorn and asyncio log through `logging`, not structlog."""
    probe = (
        "from meterproof.cli.logs import configure_logging; import logging; "
        "configure_logging(); pool = logging.getLogger('psycopg.pool'); "
        "pool.info('chatter'); pool.warning('error connecting in %r', 'pool-1')"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", probe], capture_output=True, check=True, timeout=30
    )
    line = json.loads(done.stderr)
    assert (line["event"], line["level"]) == ("error connecting in 'pool-1'", "warning")
    assert line["logger"] == "psycopg.pool"


def test_configuring_again_reaches_the_loggers_already_in_use() -> None:
    """A module's logger is bound once (`cache_logger_on_first_use`): a second
    `configure_logging` in the same process (a second command run in it, as the tests do)
    gave it a list of processors that `capture_logs` no longer reached, and the tests that
    read a refusal's log line saw nothing in CI."""
    probe = (
        "from meterproof.cli.logs import configure_logging; import structlog; "
        "from structlog.testing import capture_logs; configure_logging(); "
        "log = structlog.get_logger('t'); log.info('bound'); configure_logging(); "
        "cap = capture_logs(); logs = cap.__enter__(); log.warning('refused'); "
        "cap.__exit__(None, None, None); print([e['event'] for e in logs])"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", probe], capture_output=True, check=True, timeout=30
    )
    assert done.stdout.decode().strip() == "['refused']"


def test_readable_lines_on_a_terminal() -> None:
    parent, child = os.openpty()
    try:
        subprocess.run([sys.executable, "-P", "-c", PROBE], stderr=child, check=True, timeout=30)
        os.close(child)
        child = -1
        text = b""
        while chunk := _read(parent):
            text += chunk
    finally:
        if child != -1:
            os.close(child)
        os.close(parent)
    assert b"batch_retry" in text
    assert not text.lstrip().startswith(b"{")


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the terminal's other side is closed
        return b""
