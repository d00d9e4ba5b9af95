"""What a figure was measured on: it is meaningless without the machine and the versions."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path


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
        "cores": str(os.cpu_count()),
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "mosquitto": _first_line(["mosquitto", "-h"]),
        "postgresql": _first_line(["/usr/lib/postgresql/15/bin/postgres", "--version"]),
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
