"""Fixtures live in small plugin modules under tests/fixtures; each says what it yields.

Tests never see the checkout's runtime state or the caller's configuration: before any
test runs, every `METERPROOF_*` variable is dropped and the stack env file is pointed at
a path that does not exist, so `.run/stack.env` left by `make demo` (or a shell's
`source .run/stack.env`) cannot change what a test's settings, or its child processes,
read. A test that wants a variable sets it itself.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

pytest_plugins = [
    "fixtures.servers",
    "fixtures.isolation",
    "fixtures.chain",
    "fixtures.api",
    "fixtures.ha",
]


def pytest_configure(config: pytest.Config) -> None:
    for name in [name for name in os.environ if name.startswith("METERPROOF_")]:
        del os.environ[name]
    nowhere = Path(tempfile.gettempdir()) / f"meterproof-tests-{os.getpid()}" / "no-stack.env"
    os.environ["METERPROOF_STACK_ENV"] = str(nowhere)
