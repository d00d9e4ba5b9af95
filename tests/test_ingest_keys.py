"""The key cache against a real registry: a change notified while a fetch is on its way
must not leave the answer from before the change cached for the (long) TTL."""

from __future__ import annotations

import asyncio
import contextlib

import psycopg
from ingest_harness import provision
from waiting import async_wait_until

from meterproof.certs.layout import PkiLayout
from meterproof.ingest.keys import KeyCache
from meterproof.registry import repository
from meterproof.registry.model import MeterStatus
from meterproof.registry.snapshots import MeterSnapshot


class _ChangedDuringFetch(KeyCache):
    """Quarantines the meter once, after the registry answered and before that answer
    is stored, and waits until the notification has reached the cache."""

    def __init__(self, *, database_url: str, meter_id: str) -> None:
        super().__init__(database_url=database_url, ttl_s=3600)
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
