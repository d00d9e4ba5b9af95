"""The key cache against a real registry: a change notified while a fetch is on its way
must not leave the answer from before the change cached for the (long) TTL."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import psycopg
from ingest_harness import SilentProxy, provision
from waiting import async_wait_until

from meterproof.certs.layout import PkiLayout
from meterproof.ingest.keys import KeyCache
from meterproof.registry import repository
from meterproof.registry.model import MeterStatus
from meterproof.registry.snapshots import MeterSnapshot
from meterproof.stack.postgres import PostgresServer


class _ChangedDuringFetch(KeyCache):
    """Quarantines the meter once, after the registry answered and before that answer
    is stored, and waits until the notification has reached the cache."""

    def __init__(self, *, database_url: str, meter_id: str) -> None:
        super().__init__(database_url=database_url, ttl_s=3600, timeout_s=30)
        self._meter_id = meter_id
        self.changed = False

    async def _fetch(self, meter_ids: list[str]) -> dict[str, MeterSnapshot]:
        fetched = await super()._fetch(meter_ids)
        if not self.changed:
            self.changed = True
            self._entries[self._meter_id] = (float("inf"), None)  # seen when it is dropped
            with psycopg.connect(self._url, autocommit=True) as conn:
                repository.set_status(conn, self._meter_id, MeterStatus.QUARANTINED)
            await async_wait_until(
                lambda: self._meter_id not in self._entries, what="the notification"
            )
        return fetched


def test_a_change_notified_during_a_fetch_is_not_hidden_by_its_answer(
    pki: PkiLayout, database_url: str, meter_id: str
) -> None:
    provision(pki, database_url, meter_id)

    async def scenario() -> tuple[str, str]:
        cache = _ChangedDuringFetch(database_url=database_url, meter_id=meter_id)
        stop = asyncio.Event()
        listener = asyncio.create_task(cache.listen(stop))
        try:
            await asyncio.wait_for(cache.listening.wait(), 10)
            during = (await cache.snapshots([meter_id]))[meter_id]
            after = (await cache.snapshots([meter_id]))[meter_id]
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await cache.close()
        assert during is not None
        assert after is not None
        return during.status, after.status

    during, after = asyncio.run(scenario())
    assert during == "active"  # the batch in hand was judged by the answer it asked for
    assert after == "quarantined"  # the next one asks again


def test_after_a_lost_listen_the_lookups_connection_is_made_again(
    pki: PkiLayout,
    postgres: PostgresServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    """The server goes silent; the listen's probe finds it lost and the listen is made
    again (a failover's new primary), which drops the cache. The next lookup went to the
    lookups' own connection, still on the silent server, and waited `timeout_s` there;
    with the default, every reading stood 30 s more after the failover. That connection
    is made again with the listen."""
    first, second = make_meter_id(), make_meter_id()
    for meter_id in (first, second):
        provision(pki, database_url, meter_id)
    proxy = SilentProxy(postgres.port)

    async def scenario() -> tuple[MeterSnapshot | None, float]:
        async with proxy.serving(database_url) as via:
            cache = KeyCache(database_url=via, ttl_s=3600, timeout_s=4)
            stop = asyncio.Event()
            listener = asyncio.create_task(cache.listen(stop))
            try:
                await asyncio.wait_for(cache.listening.wait(), 10)
                assert (await cache.snapshots([first]))[first] is not None
                proxy.silence()
                await async_wait_until(
                    lambda: not cache.listening.is_set(), what="the listen lost", within_s=20
                )
                await asyncio.wait_for(cache.listening.wait(), 10)
                started = time.monotonic()
                found = (await cache.snapshots([second]))[second]
                return found, time.monotonic() - started
            finally:
                stop.set()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
                await cache.close()

    found, took_s = asyncio.run(scenario())
    assert found is not None
    assert took_s < 2, f"the lookup waited {took_s:.1f} s on the silent connection"
