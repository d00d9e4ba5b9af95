"""`meterproof ingest --workers N` stopped by a SIGTERM that comes while it starts them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from meterproof.certs.layout import PkiLayout
from meterproof.config import new_share_group
from meterproof.stack.process import free_port

#: The supervisor, with a SIGTERM sent to itself just after it started its first worker
#: (whose pid it prints): the moment of a `systemctl stop` right after a start.
_TERMINATED_AS_IT_STARTS = """
import os, signal, subprocess, sys
from meterproof.cli.main import run

class Popen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        print(self.pid, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

subprocess.Popen = Popen
sys.argv = ["meterproof", "ingest", "--workers", "2"]
run()
"""


@pytest.mark.slow
def test_a_sigterm_as_the_first_worker_starts_stops_that_worker_too(
    pki: PkiLayout, database_url: str, tmp_path: Path
) -> None:
    """The supervisor installed its SIGTERM handler after starting its workers: a SIGTERM
    before that ended the supervisor alone (exit 143), and its first worker ran on without
    a parent, retrying a broker it could not reach. Now that worker is stopped too, no
    other is started, and the supervisor exits 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERPROOF_")}
    env |= {
        "METERPROOF_PKI_ROOT": str(pki.root),
        "METERPROOF_SHARE_GROUP": new_share_group(),
        "METERPROOF_DATABASE_URL": database_url,
        "METERPROOF_MQTT_PORT": str(free_port()),  # nothing there: a worker retries it
        "METERPROOF_METRICS_PORT": "0",
    }
    out = tmp_path / "pids"
    with out.open("wb") as pids, (tmp_path / "ingest.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-c", _TERMINATED_AS_IT_STARTS],
            env=env, cwd=tmp_path, stdout=pids, stderr=log,
        )  # fmt: skip
    workers: list[psutil.Process] = []
    try:
        code = proc.wait(60)
        started = out.read_text().split()
        for pid in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                workers.append(psutil.Process(int(pid)))
        _, alive = psutil.wait_procs(workers, timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
        for worker in workers:
            with contextlib.suppress(psutil.Error):
                worker.kill()
    assert (code, len(started), alive) == (0, 1, [])
