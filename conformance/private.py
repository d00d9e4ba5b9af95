"""The kit's private stack behind its broker: a PostgreSQL cluster of the run's own, the
meter registered there with its key, and one real ingest worker process (`meterproof
ingest`, as an operator starts it). A receipt the meter gets is the product's receipt,
sent after the product's commit.

The kit withholds receipts by pausing the worker (SIGSTOP of its process group) and
gives them back by resuming it (SIGCONT): readings wait in the worker's persistent
session meanwhile, as behind a worker that is stuck, and the broker holds the copies a
meter republishes in the meantime too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Final

import psycopg

from meterproof.config import StackEnv
from meterproof.db.migrate import migrate
from meterproof.errors import UnavailableError
from meterproof.registry import repository
from meterproof.registry.model import MeterStatus, NewKey, NewMeter
from meterproof.schemas.signatures import PublicKey
from meterproof.stack.commands import command_environ, meterproof_argv, start_command, stop_command
from meterproof.stack.postgres import PostgresServer

WORKER: Final = "ingest-0"
_READY_EVENT: Final = b"broker_subscribed"
_READY_TIMEOUT_S: Final = 60.0
_STOP_GRACE_S: Final = 10.0


class PrivateStack:
    """Started in order (`start_database`, then `start_worker` once the broker is up),
    closed once; `--run-dir` keeps the worker's log in `ingest.log`."""

    def __init__(self, run_dir: Path, env: StackEnv) -> None:
        self.run_dir = run_dir
        self.database = PostgresServer(directory=run_dir / "postgres")
        self.env = env.model_copy(update={"database_url": self.database.url})
        self.worker_log = run_dir / "ingest.log"
        self._worker: subprocess.Popen[bytes] | None = None
        self._paused = False

    def start_database(self, meter_id: str, key: PublicKey) -> None:
        """initdb (first time), migrations, and the meter registered, active, with its key."""
        self.database.start()
        migrate(self.database.url)
        meter = NewMeter(meter_id, NewKey.parse(key.alg, key.pem()), status=MeterStatus.ACTIVE)
        with psycopg.connect(self.database.url, autocommit=True) as conn:
            repository.register(conn, [meter])

    def start_worker(self, *, broker_lost_exit_s: float) -> None:
        """One worker on the run's broker and database; returns once it has subscribed."""
        environ = command_environ(
            self.env,
            METERPROOF_IDENTITY=WORKER,
            METERPROOF_REDIS_URL="",  # no Redis: the database alone decides duplicates
            METERPROOF_METRICS_PORT="0",
            METERPROOF_BROKER_LOST_EXIT_S=f"{broker_lost_exit_s:.0f}",
        )
        offset = self.worker_log.stat().st_size if self.worker_log.exists() else 0
        proc = start_command(meterproof_argv("ingest"), environ, self.worker_log)
        self._worker = proc
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while _READY_EVENT not in self.worker_log.read_bytes()[offset:]:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = self.worker_log.read_text(errors="replace")[-1500:]
                raise UnavailableError("ingest worker", f"did not subscribe: {tail}")
            time.sleep(0.1)

    def pause(self) -> None:
        """Receipts stop: the worker takes nothing more until `resume`."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self._paused = False

    def stored(self, meter_id: str) -> int:
        """Readings of the meter the worker committed."""
        with psycopg.connect(self.database.url, connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT count(*) FROM readings WHERE meter_id = %s", (meter_id,)
            ).fetchone()
        return int(row[0]) if row else 0

    def close(self, *, keep_database: bool) -> None:
        """Stop the worker (resumed first, so it can drain) and the database; the cluster
        is deleted unless kept (as root it may live outside the run dir)."""
        if self._worker is not None:
            if self._paused:
                self.resume()
            stop_command(self._worker, timeout_s=_STOP_GRACE_S)
            self._worker = None
        if keep_database:
            self.database.stop()
        else:
            self.database.remove()

    def _signal(self, sig: signal.Signals) -> None:
        if self._worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._worker.pid, sig)
