"""heap.keep_freed_memory: buffers of megabytes built and freed over and over (the API's
history answers) come back without the kernel faulting their pages in again."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest
from fixtures.api import ApiServer
from pydantic import ValidationError

from meterproof.api.settings import ApiSettings

_ROUNDS = """
import resource, sys
from meterproof.heap import keep_freed_memory
if int(sys.argv[1]):
    assert keep_freed_memory(int(sys.argv[1]) << 20)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def round_():  # three 7 MiB buffers alive at once, as a meter-day answer's copies are
    held = [b"x" * (7 << 20) for _ in range(3)]
    del held
for _ in range(3):
    round_()
before = faults()
for _ in range(20):
    round_()
print((faults() - before) / 20)
"""


def _faults_per_round(keep_mib: int) -> float:
    """In a process of its own: the test session's allocator stays as it was."""
    out = subprocess.run(
        [sys.executable, "-P", "-c", _ROUNDS, str(keep_mib)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout)


def test_freed_buffers_are_reused_without_page_faults() -> None:
    default, kept = _faults_per_round(0), _faults_per_round(64)
    assert default > 1_000  # 21 MiB a round: thousands of 4 KiB pages faulted in again
    assert kept < 50


def test_more_than_mallopt_can_take_keeps_as_much_as_it_can() -> None:
    """mallopt takes a C int: 4 GiB (the API setting's maximum) wrapped to 0, a trim on
    every free, the opposite of what was asked."""
    assert _faults_per_round(4096) < 50


def test_the_api_keeps_freed_memory(api_server: ApiServer) -> None:
    """`meterproof api` applies it at start (setting api_heap_keep_mib, default 64)."""
    started = [orjson.loads(line) for line in api_server.log.read_bytes().splitlines()
               if line.startswith(b"{")]  # fmt: skip
    assert {"event": "heap_kept", "keep_mib": 64}.items() <= next(
        line for line in started if line["event"].startswith("heap_")
    ).items()


def test_the_api_refuses_a_keep_glibc_cannot_hold() -> None:
    """Past 2047 MiB the setting would be cut down in silence: refused at start instead."""
    assert ApiSettings(api_heap_keep_mib=2047).api_heap_keep_mib == 2047
    with pytest.raises(ValidationError, match="api_heap_keep_mib"):
        ApiSettings(api_heap_keep_mib=2048)
