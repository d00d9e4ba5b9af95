"""What a figure was measured on: it is meaningless without the machine and the versions."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from meterproof.stack.postgres import pg_bin
from meterproof.stack.process import StackError


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not found"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def _cpu_model() -> str:
    try:
        with Path("/proc/cpuinfo").open(encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _postgres_version() -> str:
    """Of the `postgres` the stack runs (`pg_bin`'s choice), not of a fixed major."""
    try:
        return _first_line([pg_bin("postgres"), "--version"])
    except StackError:
        return "not found"


def describe() -> dict[str, str]:
    mem_kib = 0
    try:
        with Path("/proc/meminfo").open(encoding="utf-8") as info:
            mem_kib = int(info.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        # the cores this process and the servers it starts may run on (a container's
        # cpuset), not the host's count: the report divides by them
        "cores": str(len(os.sched_getaffinity(0))),
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "mosquitto": _first_line(["mosquitto", "-h"]),
        "postgresql": _postgres_version(),
        "redis": _first_line(["redis-server", "--version"]),
        "meterproof": metadata.version("meterproof"),
        "pynacl": metadata.version("pynacl"),
        "solders": metadata.version("solders"),
        "gmqtt": metadata.version("gmqtt"),
        "uvloop": metadata.version("uvloop"),
        "psycopg": metadata.version("psycopg"),
        "redis-py": metadata.version("redis"),
        "cryptography": metadata.version("cryptography"),
    }
