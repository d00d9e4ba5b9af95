"""A worker whose batch fails with an error no retry is for (a bug, an error an adapter did
not translate) stops cleanly and non-zero, and what it had not committed comes back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from ingest_harness import (
    PassThroughSource,
    ProbeMeter,
    provision,
    running_worker,
    stored_counts,
    worker_settings,
)
from structlog.testing import capture_logs
from waiting import async_wait_until

from meterproof.certs.layout import PkiLayout
from meterproof.ingest.records import Candidate, Rejection
from meterproof.ingest.source import mqtt_source
from meterproof.ingest.store import BatchResult, ReadingStore
from meterproof.ingest.worker import BatchStore, Worker, postgres_store
from meterproof.stack.broker import BrokerServer
from meterproof.stack.redis import RedisServer


class _Broken:
    """The real store, with a bug for one meter's readings: raised before its transaction."""

    def __init__(self, store: ReadingStore, meter_id: str, closed: list[bool]) -> None:
        self._store = store
        self._meter_id = meter_id
        self._closed = closed

    def commit_batch(
        self, candidates: Sequence[Candidate], rejections: Sequence[Rejection]
    ) -> BatchResult:
        if any(c.reading.meter_id == self._meter_id for c in candidates):
            raise KeyError(self._meter_id)
        return self._store.commit_batch(candidates, rejections)

    def close(self) -> None:
        self._store.close()
        self._closed.append(True)

    def abort(self) -> None:
        self._store.abort()


def test_a_batch_that_fails_for_a_bug_ends_the_worker_cleanly_and_loses_nothing(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    """The commit's error escaped `run` past the shutdown (source, store and caches left
    open), and with no batch after it the worker went on with its batch unacknowledged
    and nobody told. Now: one `worker_failed` line, exit code 70, the usual shutdown; the
    reading, never acknowledged, is redelivered to the next worker on the session."""
    meter_id = make_meter_id()
    key = provision(pki, database_url, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url,
        session_expiry_s=120,
    )  # fmt: skip
    closed: list[bool] = []

    def broken(conn: psycopg.Connection[tuple[object, ...]], store: ReadingStore) -> BatchStore:
        return _Broken(store, meter_id, closed)

    async def scenario() -> tuple[Worker, list[dict[str, Any]]]:
        source = mqtt_source(settings)
        worker = Worker(
            settings, source=source, store_factory=postgres_store(settings, wrap=broken)
        )
        run = asyncio.create_task(worker.run())
        meter = ProbeMeter(meter_id, key, pki, broker.port)
        try:
            await async_wait_until(worker.ready, what="worker ready")
            await meter.connect()
            meter.publish(meter.reading(1, imp=1))
            await asyncio.wait_for(run, 20)  # ends by itself
            assert not source.connected
            assert stored_counts(database_url, [meter_id]) == {}
            async with running_worker(settings):  # the same session: redelivered
                receipts = await meter.wait_receipts(1)
        finally:
            await meter.close()
        return worker, receipts

    with capture_logs() as logs:
        worker, receipts = asyncio.run(scenario())
    assert worker.exit_code == 70
    events = [e["event"] for e in logs]
    (failed,) = [e for e in logs if e["event"] == "worker_failed"]
    assert failed["log_level"] == "error"
    assert failed["error"] == f"KeyError: {meter_id!r}"
    assert events.index("worker_failed") < events.index("worker_stopped")
    assert closed == [True], "the store's connection is closed"
    assert [(r["seq"], r["status"]) for r in receipts] == [(1, "accepted")]
    assert stored_counts(database_url, [meter_id]) == {(meter_id, 1): 1}


class _FailingAnnouncer(PassThroughSource):
    """The real MQTT source, whose announcements fail for a bug (an untranslated error)."""

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        raise RuntimeError("announcement bug")


def test_a_failed_announcement_ends_the_worker_once(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    """The batch is committed; its announcement fails: one `worker_failed` line (the
    failed task was awaited again at shutdown and told twice), exit code 70."""
    meter_id = make_meter_id()
    key = provision(pki, database_url, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url
    )

    async def scenario() -> Worker:
        worker = Worker(
            settings,
            source=_FailingAnnouncer(settings),
            store_factory=postgres_store(settings),
        )
        run = asyncio.create_task(worker.run())
        meter = ProbeMeter(meter_id, key, pki, broker.port)
        try:
            await async_wait_until(worker.ready, what="worker ready")
            await meter.connect()
            meter.publish(meter.reading(1, imp=1))
            await asyncio.wait_for(run, 20)  # ends by itself
        finally:
            await meter.close()
        return worker

    with capture_logs() as logs:
        worker = asyncio.run(scenario())
    assert worker.exit_code == 70
    failed = [e for e in logs if e["event"] == "worker_failed"]
    assert [e["error"] for e in failed] == ["RuntimeError: announcement bug"]
    assert stored_counts(database_url, [meter_id]) == {(meter_id, 1): 1}
