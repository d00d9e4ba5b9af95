"""SIGTERM ends a `meterproof` command as Ctrl-C does (`cli.main.run`): what it started is
stopped and its temporary folders are removed, instead of servers left running without a
parent on the ports the next run wants."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import psutil
import pytest


def _lines(stream: IO[str], sink: queue.Queue[str]) -> None:
    for line in stream:
        sink.put(line)


def _wait_for_line(lines: queue.Queue[str], needle: str, proc: subprocess.Popen[str]) -> None:
    seen: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            assert proc.poll() is None, f"exited {proc.returncode}: {''.join(seen)}"
            continue
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"no {needle!r} in 120 s: {''.join(seen)}")


def _started_by(pid: int, folders: list[Path]) -> list[psutil.Process]:
    """`pid`'s descendants, and the servers (PostgreSQL goes through pg_ctl, so it is not
    one) whose command line names a file in one of `folders`, with their own."""
    found = psutil.Process(pid).children(recursive=True)
    for p in psutil.process_iter(["cmdline"]):
        if any(str(f) in arg for f in folders for arg in p.info["cmdline"] or ()):
            found += [p, *p.children(recursive=True)]
    return list({p.pid: p for p in found}.values())


@pytest.mark.slow
def test_a_terminated_bench_run_stops_its_servers_and_removes_its_folder(
    tmp_path: Path,
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "meterproof", "bench", "load", "--rates", "50",
         "--seconds", "600", "--meters", "4", "--workers", "1", "--search", "0"],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    started: list[psutil.Process] = []
    cluster: Path | None = None
    try:
        _wait_for_line(lines, "warmup:", proc)  # the tiers follow at once
        (run_dir,) = tmp_path.iterdir()
        assert run_dir.name.startswith("meterproof-bench-")
        # PostgreSQL cannot enter pytest's 0700 folders: its cluster is in its own home
        cluster = (run_dir / "stack" / "postgres").resolve()
        started = _started_by(proc.pid, [tmp_path, cluster])
        names = " ".join(" ".join(p.cmdline()) for p in started)
        for server in ("postgres", "mosquitto", "redis-server", "meterproof ingest"):
            assert server in names, names

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(started, timeout=30)
        assert alive == []
        assert list(tmp_path.iterdir()) == []
        assert not cluster.exists()
    finally:  # without the handler, what the run started outlives it: end it here
        if proc.poll() is None:
            proc.kill()
        for p in started:
            with contextlib.suppress(psutil.Error):
                p.kill()
        proc.wait(timeout=30)
        reader.join(10)
        proc.stdout.close()
        if cluster is not None:
            shutil.rmtree(cluster, ignore_errors=True)
