"""`meterproof ingest`: run one worker, or supervise N worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import click
import structlog
from pydantic import ValidationError

from ingest.settings import IngestSettings

log = structlog.get_logger("ingest.cli")


@click.command()
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Worker processes; each has its own persistent session on the shared subscription.",
)
@click.option(
    "--client-id",
    default=None,
    help="MQTT client id (the persistent session's name). Default: ingest-<host>-0; "
    "with --workers N, ingest-<host>-<i>. Keep it stable: unacknowledged messages wait in it.",
)
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    envvar="METERPROOF_CONFIG",
    help="TOML file of settings (see docs/ingest.sample.toml).",
)
def ingest(workers: int, client_id: str | None, config: str | None) -> None:
    """Verify, deduplicate and store readings; acknowledge, receipt and republish after commit.

    Settings come from METERPROOF_* variables, .run/stack.env, and --config. SIGTERM drains
    the batch in hand and exits; what was not committed is redelivered by the broker.
    """
    if config:
        os.environ["METERPROOF_CONFIG"] = config
    try:
        settings = IngestSettings()
        if client_id:
            settings = settings.model_copy(update={"client_id": client_id})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise click.ClickException(f"invalid setting {where}: {first['msg']}") from None
    if workers == 1:
        asyncio.run(_run(settings))
        return
    _supervise(settings, workers)


async def _run(settings: IngestSettings) -> None:
    from ingest.worker import run_worker

    await run_worker(settings)


def _supervise(settings: IngestSettings, workers: int) -> None:
    """Start N workers with stable client ids and metrics ports (base + i), restart any
    that dies, stop all on SIGTERM."""
    base = settings.client_id.rsplit("-", 1)[0]
    ids = [f"{base}-{i}" for i in range(workers)]
    argv = [sys.executable, "-P", "-m", "cli", "ingest", "--workers", "1", "--client-id"]

    def spawn(i: int) -> subprocess.Popen[bytes]:
        port = settings.metrics_port + i if settings.metrics_port else 0  # worker i: base + i
        env = {**os.environ, "METERPROOF_METRICS_PORT": str(port)}
        return subprocess.Popen([*argv, ids[i]], env=env)

    procs = {cid: spawn(i) for i, cid in enumerate(ids)}
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while procs:
        for cid, proc in list(procs.items()):
            code = proc.poll()
            if code is None:
                continue
            if stopping:
                del procs[cid]
            else:
                log.error("worker_died_restarting", client_id=cid, exit_code=code)
                procs[cid] = spawn(ids.index(cid))
        time.sleep(0.2)
