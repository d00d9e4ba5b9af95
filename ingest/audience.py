"""Who receives a verified reading's live copy: the consent policy over a cached view.

The view (consent/policy.py `ConsentView`) is loaded whole from PostgreSQL at start and
again after every NOTIFY on `meterproof_consents` (a grant, a revocation, an integrator
revoked, a wallet linked), so a change reaches the live feeds within a second of its
commit without any integrator reconnecting. Expiry and the consented period are checked
per reading by `may_see`, from the view in hand. Notifications that arrive while a
reload runs are folded into one more reload. If the LISTEN connection is lost, the view
is reloaded after reconnecting, since changes may have been missed meanwhile; until then
the old view stays, and nothing new is published anyway while the database is down. A
database that goes silent instead (a host lost without a reset) closes nothing: the expiry
sweep, a round trip every `EXPIRY_SWEEP_S`, then goes unanswered, is given up after
`timeout_s` (`meterproof.db.silence`), and the listen is made again with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from functools import partial
from typing import Any, Final, TypeVar

import psycopg
import structlog
from prometheus_client import Counter, Gauge

from meterproof.consent import repository
from meterproof.consent.model import Scope
from meterproof.consent.policy import EMPTY, ConsentView, may_see
from meterproof.db.connect import connect_async, connect_sync
from meterproof.db.silence import answered, bounded, cut
from meterproof.ingest.telemetry import DEPENDENCY_ERRORS

log = structlog.get_logger("ingest.audience")

_T = TypeVar("_T")

#: How often expired consents get their audit event (the policy refuses them at once).
EXPIRY_SWEEP_S: Final = 5.0

DELIVERIES: Final = Counter(
    "meterproof_consumer_deliveries",
    "Verified readings delivered on an integrator's live feed",
    ["integrator"],
)
REFUSALS: Final = Counter(
    "meterproof_consumer_refusals",
    "Readings an integrator with a live consent for the meter did not receive, by reason",
    ["door", "integrator", "reason"],
)
VIEW_SIZE: Final = Gauge(
    "meterproof_consent_view_grants", "Active (meter, consent) pairs in this process's view"
)
RELOAD_SECONDS: Final = Gauge(
    "meterproof_consent_view_reload_seconds", "How long the last consent view reload took"
)


class Audience:
    def __init__(self, *, database_url: str, timeout_s: float) -> None:
        """`timeout_s`: how long the listen or a reload may go unanswered
        (`meterproof.db.silence`)."""
        self._url = bounded(database_url, timeout_s)
        self._timeout_s = timeout_s
        self.view: ConsentView = EMPTY
        self.loaded = asyncio.Event()

    def of(self, meter_id: str, ts_ms: int, now_ms: int) -> list[str]:
        """The integrators whose live feed gets this reading; refusals are counted."""
        names = self.view.live_candidates(meter_id)
        if not names:
            return []
        allowed = []
        for name in names:
            decision = may_see(name, meter_id, ts_ms, Scope.LIVE, view=self.view, now_ms=now_ms)
            if decision.refusal is None:
                allowed.append(name)
                DELIVERIES.labels(integrator=name).inc()
            else:
                REFUSALS.labels(door="mqtt", integrator=name, reason=decision.refusal).inc()
        return allowed

    async def run(self, stop: asyncio.Event, *, retry_s: float = 1.0) -> None:
        """Until `stop`: reload after every notification, sweep expiries, reconnect after
        a loss."""
        while not stop.is_set():
            try:
                async with await connect_async(self._url, autocommit=True) as listener:
                    await self._answered(listener.execute(f"LISTEN {repository.CHANNEL}"), listener)
                    with await _connected(self._url) as conn:
                        await self._reload(conn)
                        swept = time.monotonic()
                        while not stop.is_set():
                            changed = False
                            async for _ in listener.notifies(timeout=0.2):
                                changed = True
                            if changed:
                                await self._reload(conn)
                            if time.monotonic() - swept > EXPIRY_SWEEP_S:
                                await self._answered(
                                    asyncio.to_thread(repository.record_expiries, conn), conn
                                )
                                swept = time.monotonic()
                    return
            except psycopg.Error as exc:
                DEPENDENCY_ERRORS.labels(dependency="database").inc()
                log.warning("consent_listen_lost", error=str(exc), retry_in_s=retry_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), retry_s)

    async def _answered(
        self, job: Awaitable[_T], conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]
    ) -> _T:
        return await answered(
            job, within_s=self._timeout_s, cut_off=partial(cut, conn), wait="consent_view"
        )

    async def _reload(self, conn: psycopg.Connection[Any]) -> None:
        started = time.perf_counter()
        self.view = await self._answered(asyncio.to_thread(repository.load_view, conn), conn)
        elapsed = time.perf_counter() - started
        RELOAD_SECONDS.set(elapsed)
        VIEW_SIZE.set(self.view.size)
        self.loaded.set()
        log.info("consent_view_loaded", grants=self.view.size, ms=round(elapsed * 1000, 1))


def _connect(url: str) -> psycopg.Connection[Any]:
    return connect_sync(url, autocommit=True)


async def _connected(url: str) -> psycopg.Connection[Any]:
    """A connection made on a thread. Cancelled meanwhile (the worker stopping), the thread
    still finishes it: it is closed when it comes, not left open for the collector."""
    job = asyncio.ensure_future(asyncio.to_thread(_connect, url))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        job.add_done_callback(_close_late)
        raise


def _close_late(job: asyncio.Future[psycopg.Connection[Any]]) -> None:
    if not job.cancelled() and job.exception() is None:
        job.result().close()
