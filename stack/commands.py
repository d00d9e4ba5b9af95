"""meterproof's own commands as child processes, started the way an operator starts them
(the demo, the chaos campaign), so what those exercise is the product, not a special path."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from meterproof.config import StackEnv


def meterproof_argv(*args: str) -> list[str]:
    """`-P`: a `certs/` folder in the working directory must not shadow the package."""
    return [sys.executable, "-P", "-m", "meterproof", *args]


def command_environ(env: StackEnv, **extra: str) -> dict[str, str]:
    """The stack's METERPROOF_* addresses on top of this process's environment."""
    values = dict(line.split("=", 1) for line in env.to_env_lines())
    return {**os.environ, **values, **extra}


def start_command(argv: list[str], environ: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """In a session of its own, so stopping reaches the worker processes it starts too."""
    with log.open("ab") as sink:
        return subprocess.Popen(argv, env=environ, stdout=sink, stderr=sink, start_new_session=True)


def stop_command(proc: subprocess.Popen[bytes], *, timeout_s: float = 30) -> None:
    """SIGTERM to the whole session (a drain), SIGKILL if it has not ended in time."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
