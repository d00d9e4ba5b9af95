"""`meterproof ingest`: run one worker, or supervise N worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import click
import structlog
from pydantic import ValidationError

from meterproof.backoff import Backoff
from meterproof.certs.identities import ingest_identity, ingest_instance
from meterproof.certs.layout import PkiLayout
from meterproof.config import invalid_settings
from meterproof.ingest.settings import IngestSettings

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
    "--identity",
    default=None,
    help="This worker's certificate, ingest-<n>; the broker makes it the client id, so it "
    "names the persistent session where unacknowledged readings wait. Default: the "
    "`identity` setting (ingest-0); with --workers N, worker i is ingest-<n+i>.",
)
@click.option(
    "--follow-load/--all-subscribed",
    default=True,
    show_default=True,
    help="With --workers N and a redis_url: the first worker always takes readings, the "
    "others only while it is busy (ingest/follow.py); fewer transactions at a trickle.",
)
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    envvar="METERPROOF_CONFIG",
    help="TOML file of settings (see docs/ingest.sample.toml).",
)
def ingest(workers: int, identity: str | None, follow_load: bool, config: str | None) -> None:
    """Verify, deduplicate and store readings; acknowledge, receipt and republish after commit.

    Settings come from METERPROOF_* variables, .run/stack.env, and --config. SIGTERM drains
    the batch in hand and exits; what was not committed is redelivered by the broker.
    """
    if config:
        os.environ["METERPROOF_CONFIG"] = config
    try:
        overrides: dict[str, Any] = {"identity": identity} if identity else {}
        settings = IngestSettings(**overrides)
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"])
        raise click.ClickException(invalid_settings(exc) + _HINTS.get(where, "")) from None
    identities = _identities(settings, workers)
    _check_metrics_ports(settings, workers)
    if workers == 1:
        asyncio.run(_run(settings))
        return
    _supervise(settings, identities, follow=follow_load and settings.redis_url is not None)


_HINTS = {
    "share_group": " (a secret: `meterproof stack up` writes one to .run/stack.env as "
    "METERPROOF_SHARE_GROUP; never give it to meters)",
}


def _identities(settings: IngestSettings, workers: int) -> list[str]:
    """The certificates the workers will use, each checked to exist before anything starts."""
    first = ingest_instance(settings.identity)
    try:
        names = [ingest_identity(first + i) for i in range(workers)]
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    pki = PkiLayout(settings.pki_root)
    missing = [n for n in names if not _has_certificate(pki, n)]
    if missing:
        raise click.ClickException(
            f"no certificate for ingest worker {', '.join(missing)} in {pki.services_dir}: "
            f"each worker needs its own; run `meterproof certs issue-service ingest "
            f"--instances {first + workers}`"
        )
    return names


#: The highest TCP port.
_LAST_PORT: Final = 65535


def _check_metrics_ports(settings: IngestSettings, workers: int) -> None:
    """Worker i serves /metrics on metrics_port + i (`_supervise`): one past the last port
    would refuse its settings at every restart."""
    last = settings.metrics_port + workers - 1
    if settings.metrics_port and last > _LAST_PORT:
        raise click.ClickException(
            f"--workers {workers} would serve /metrics on ports {settings.metrics_port} to "
            f"{last}, past {_LAST_PORT}: lower metrics_port, or set it to 0 to disable /metrics"
        )


async def _run(settings: IngestSettings) -> None:
    from meterproof.ingest.worker import run_worker

    await run_worker(settings)


def _has_certificate(pki: PkiLayout, name: str) -> bool:
    files = pki.service(name)
    return files.cert.is_file() and files.key.is_file()


#: A worker that died is started again after 0.2 s, then after twice as long each time it
#: dies again soon after its start, up to 30 s (a broker that refuses it): never in a tight
#: loop. One that ran for `_RAN_WELL_S` before it died (killed, or cut off from its broker
#: for `broker_lost_exit_s`) is started again after 0.2 s.
_RESTART_INITIAL_S: Final = 0.2
_RESTART_MAX_S: Final = 30.0
_RAN_WELL_S: Final = 10.0


class _Restarts:
    """When each worker that died may start again (`_RESTART_INITIAL_S`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started: dict[str, float] = {}
        self._backoff: dict[str, Backoff] = {}
        self._due: dict[str, float] = {}

    def started(self, identity: str) -> None:
        self._started[identity] = self._clock()

    def died(self, identity: str) -> float:
        """Schedules the restart; returns how long until it."""
        backoff = self._backoff.setdefault(
            identity, Backoff(_RESTART_INITIAL_S, _RESTART_MAX_S, jitter=lambda: 1.0)
        )
        now = self._clock()
        if now - self._started[identity] >= _RAN_WELL_S:
            backoff.reset()
        delay = backoff.next_s()
        self._due[identity] = now + delay
        return delay

    def due(self) -> list[str]:
        """The workers whose restart is due now, each returned once."""
        now = self._clock()
        ready = [identity for identity, at in self._due.items() if at <= now]
        for identity in ready:
            del self._due[identity]
        return ready

    @property
    def pending(self) -> bool:
        return bool(self._due)


def _supervise(settings: IngestSettings, ids: list[str], *, follow: bool) -> None:
    """Start one worker per identity with metrics port base + i (all but the first
    following the load if `follow`), restart any that dies (`_Restarts`), stop all on
    SIGTERM. The handlers come before the first worker: a SIGTERM that came between them
    ended the supervisor alone (`cli.main`), its first workers left running."""
    argv = [sys.executable, "-P", "-m", "meterproof", "ingest", "--workers", "1", "--identity"]
    restarts = _Restarts()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)

    def spawn(i: int) -> None:
        port = settings.metrics_port + i if settings.metrics_port else 0  # worker i: base + i
        env = {**os.environ, "METERPROOF_METRICS_PORT": str(port)}
        if follow:
            env["METERPROOF_FOLLOW_LOAD"] = "true" if i else "false"
        restarts.started(ids[i])
        procs[ids[i]] = proc = subprocess.Popen([*argv, ids[i]], env=env)
        if stopping:  # SIGTERM came while it was starting: `stop` did not see it
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(len(ids)):
        if not stopping:
            spawn(i)
    while procs or (restarts.pending and not stopping):
        for cid, proc in list(procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del procs[cid]
            if not stopping:
                delay = restarts.died(cid)
                log.error(
                    "worker_died_restarting",
                    identity=cid,
                    exit_code=code,
                    restart_in_s=round(delay, 3),
                )
        for cid in [] if stopping else restarts.due():
            spawn(ids.index(cid))
        time.sleep(0.2)
