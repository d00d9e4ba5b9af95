"""The backlog drain: its figures count from the workers' readiness, as a live tier counts
its window only, and its workers never outlive it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from meterproof.bench.cpu import process_tree
from meterproof.bench.ingest import run_drain
from meterproof.bench.stacks import stop_workers

#: A supervisor that starts a worker and ignores SIGTERM, as one stuck in its shutdown.
_STUCK = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(worker.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_supervisor_that_ignores_sigterm_is_killed_with_its_workers() -> None:
    supervisor = subprocess.Popen(
        [sys.executable, "-c", _STUCK], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert supervisor.stdout is not None
    worker = int(supervisor.stdout.readline())
    try:
        stop_workers(supervisor, timeout=1)
        assert supervisor.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker)
    finally:
        supervisor.stdout.close()
        for pid in (supervisor.pid, worker):
            if _alive(pid):
                psutil.Process(pid).kill()


@pytest.mark.slow
def test_the_drains_figures_leave_the_workers_start_up_out(tmp_path: Path) -> None:
    """A small backlog drains in less time and CPU than the workers take to start (imports,
    TLS, connects): counted from their launch, the start-up swamped both figures."""
    whole: dict[str, float] = {}
    tree: list[int] = []

    @contextmanager
    def observe(pid: int) -> Iterator[None]:
        began = time.perf_counter()
        yield
        whole["s"] = time.perf_counter() - began
        tree[:] = process_tree(pid)
        whole["cpu_s"] = sum(sum(psutil.Process(p).cpu_times()[:2]) for p in tree)

    result = run_drain(
        run_dir=tmp_path, readings=2_000, meters=10, workers=1, progress=lambda _: None,
        observe=observe,
    )  # fmt: skip
    assert result.readings == 2_000
    assert 0 < result.worker_cpu_s < 0.8 * whole["cpu_s"], (result, whole)
    assert 0 < result.drain_s < 0.8 * whole["s"], (result, whole)
    assert result.drain_per_s == pytest.approx(
        (result.readings - result.stored_at_ready) / result.drain_s
    )
    assert result.server_us_per_reading["workers"] == pytest.approx(
        result.cpu_us_per_reading, abs=0.1
    )
    assert result.startup_cpu_s["workers"] > result.worker_cpu_s
    assert [p for p in tree if _alive(p)] == []  # stopped with the drain
