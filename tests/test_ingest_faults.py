"""Nothing lost, nothing twice: a stream of readings through worker kills and outages of
the broker, PostgreSQL and Redis, audited by (meter_id, seq) in the database."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from ingest_harness import (
    CommitCutter,
    ProbeMeter,
    SilentProxy,
    WorkerProcess,
    audit_exactly_once,
    provision,
    running_worker,
    stored_counts,
    stream_readings,
    until_stored,
    worker_settings,
)
from waiting import async_wait_until

from meterproof.certs.layout import PkiLayout
from meterproof.ingest.source import PUBLISHES_DROPPED
from meterproof.ingest.telemetry import ACCEPTED
from meterproof.registry.model import NewKey
from meterproof.registry.repository import rotate_key
from meterproof.schemas.signatures import generate_private_key
from meterproof.stack.broker import BrokerServer
from meterproof.stack.postgres import PostgresServer
from meterproof.stack.redis import RedisServer

pytestmark = pytest.mark.slow

METERS = 3


async def _meters(
    pki: PkiLayout, port: int, ids: list[str], keys: dict[str, Any]
) -> list[ProbeMeter]:
    meters = [ProbeMeter(m, keys[m], pki, port) for m in ids]
    for m in meters:
        await m.connect()
    return meters


def _run_stream_with_fault(
    *,
    pki: PkiLayout,
    broker: BrokerServer,
    database_url: str,
    redis_url: str | None,
    make_meter_id: Callable[[], str],
    fault: Callable[[], Awaitable[None]],
    count: int = 60,
    drain_s: float = 60,
) -> None:
    ids = [make_meter_id() for _ in range(METERS)]
    keys = {m: provision(pki, database_url, m) for m in ids}
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_url
    )
    t0 = int(time.time() * 1000) - 3_600_000

    async def scenario() -> None:
        async with running_worker(settings):
            meters = await _meters(pki, broker.port, ids, keys)
            stream = asyncio.create_task(stream_readings(meters, count, 0.05, t0))
            await asyncio.sleep(0.5)
            await fault()
            sent = await stream
            await until_stored(database_url, meters, sent, drain_s)
            for m in meters:
                await m.close()

    asyncio.run(scenario())
    audit_exactly_once(database_url, ids, count)


def test_kill9_of_a_worker_mid_stream_loses_nothing(
    tmp_path: Path,
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    ids = [make_meter_id() for _ in range(METERS)]
    keys = {m: provision(pki, database_url, m) for m in ids}
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url,
        session_expiry_s=300,
    )  # fmt: skip
    count = 80
    t0 = int(time.time() * 1000) - 3_600_000
    kills = 0

    async def scenario() -> None:
        nonlocal kills
        worker = WorkerProcess(settings, tmp_path / "worker.log")
        await asyncio.to_thread(worker.start)
        meters = await _meters(pki, broker.port, ids, keys)
        stream = asyncio.create_task(stream_readings(meters, count, 0.05, t0))
        rng = random.Random(7)
        try:
            # Three kills whatever the machine's speed: on a slow one the stream may end
            # first, and the later kills then hit the worker while it drains the backlog.
            while kills < 3:
                await asyncio.sleep(rng.uniform(0.8, 1.6))
                await asyncio.to_thread(worker.kill9)
                kills += 1
                await asyncio.to_thread(worker.start)
            sent = await stream
            await until_stored(database_url, meters, sent, 60)
        finally:
            await asyncio.to_thread(worker.stop)
            for m in meters:
                await m.close()

    asyncio.run(scenario())
    assert kills == 3
    audit_exactly_once(database_url, ids, count)


def test_graceful_broker_restart_loses_nothing(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    async def restart() -> None:
        await asyncio.to_thread(broker.restart)

    _run_stream_with_fault(
        pki=pki, broker=broker, database_url=database_url, redis_url=redis_server.url,
        make_meter_id=make_meter_id, fault=restart,
    )  # fmt: skip


def test_postgres_down_for_20_seconds_loses_nothing(
    pki: PkiLayout,
    broker: BrokerServer,
    postgres: PostgresServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    async def outage() -> None:
        await asyncio.to_thread(postgres.stop)
        await asyncio.sleep(20)
        await asyncio.to_thread(postgres.start)

    _run_stream_with_fault(
        pki=pki, broker=broker, database_url=database_url, redis_url=redis_server.url,
        make_meter_id=make_meter_id, fault=outage, count=40, drain_s=90,
    )  # fmt: skip


def test_redis_down_the_database_path_carries_on(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    async def outage() -> None:
        await asyncio.to_thread(redis_server.stop)
        await asyncio.sleep(3)
        await asyncio.to_thread(redis_server.start)

    _run_stream_with_fault(
        pki=pki, broker=broker, database_url=database_url, redis_url=redis_server.url,
        make_meter_id=make_meter_id, fault=outage,
    )  # fmt: skip


def test_a_worker_started_before_its_broker_waits_for_it(
    tmp_path: Path,
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    """A worker whose broker refuses the first connection (a machine booting, the broker
    restarting) retries with backoff instead of exiting, and then stores and receipts."""
    meter_id = make_meter_id()
    key = provision(pki, database_url, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    broker.kill9()
    try:
        offset = worker.launch()
        worker.wait_for("broker_unreachable_at_start", offset)
        assert worker.proc is not None
        assert worker.proc.poll() is None
    finally:
        broker.start()
    try:
        worker.wait_for("broker_subscribed", offset)

        async def one_reading() -> list[dict[str, Any]]:
            (meter,) = await _meters(pki, broker.port, [meter_id], {meter_id: key})
            meter.publish(meter.reading(1, imp=10))
            try:
                return await meter.wait_receipts(1)
            finally:
                await meter.close()

        (receipt,) = asyncio.run(one_reading())
        assert receipt["status"] == "accepted"
    finally:
        assert worker.stop() == 0


def test_sigterm_while_the_broker_never_answers_stops_the_worker_at_once(
    tmp_path: Path, pki: PkiLayout, broker: BrokerServer, database_url: str
) -> None:
    """A broker that takes the connection and never answers held the worker's first start
    until the TLS handshake timed out (60 s), and SIGTERM (or the watchdog) waited as long.
    Stopping now ends the start, and the worker exits as usual."""
    settings = worker_settings(pki=pki, port=broker.port, database_url=database_url, redis_url=None)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.settimeout(20)
        worker = WorkerProcess(
            settings.model_copy(update={"mqtt_port": silent.getsockname()[1]}),
            tmp_path / "worker.log",
        )
        offset = worker.launch()
        assert worker.proc is not None
        try:
            link, _ = silent.accept()  # the worker's ClientHello waits there for an answer
            with link:
                started = time.monotonic()
                worker.proc.send_signal(signal.SIGTERM)
                code = worker.proc.wait(10)
                took = time.monotonic() - started
        finally:
            if worker.proc.poll() is None:
                worker.kill9()
    assert code == 0
    assert took < 5, took
    assert b"worker_stopped" in worker.log.read_bytes()[offset:]


def test_sigterm_with_the_broker_gone_and_the_outbound_window_full_still_stops(
    pki: PkiLayout,
    broker: BrokerServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    """A batch committed after its broker died has receipts the window cannot take: the
    worker still stops on SIGTERM (the reading stays stored, its receipt is lost and the
    meter's republish brings a `duplicate`)."""
    meter_id = make_meter_id()
    key = provision(pki, database_url, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=None, publish_window=1
    )
    dropped_before = PUBLISHES_DROPPED._value.get()

    async def scenario() -> float:
        (meter,) = await _meters(pki, broker.port, [meter_id], {meter_id: key})
        try:
            async with running_worker(settings) as worker:
                with psycopg.connect(database_url) as holder:  # the commit waits for it
                    holder.execute(
                        "SELECT 1 FROM meters WHERE meter_id = %s FOR UPDATE", (meter_id,)
                    )
                    meter.publish(meter.reading(1, imp=1))
                    await async_wait_until(
                        lambda: _lock_waiters(database_url) > 0, what="the batch waits"
                    )
                    await asyncio.to_thread(broker.kill9)
                # receipt and verified reading: two publishes for a window of one
                await async_wait_until(
                    lambda: worker.committed == 1, what="committed after the broker died"
                )
                started = time.monotonic()
                worker.stopping.set()
            return time.monotonic() - started
        finally:
            await asyncio.to_thread(broker.start)
            await meter.close()

    assert asyncio.run(scenario()) < 15
    assert stored_counts(database_url, [meter_id]) == {(meter_id, 1): 1}
    assert PUBLISHES_DROPPED._value.get() - dropped_before == 1  # the verified reading


def _lock_waiters(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


def _written(database_url: str, meter_id: str) -> tuple[int, int, int]:
    """Rows of the meter's readings, rejected readings and bad-signature events."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM readings WHERE meter_id = %(m)s),"
            " (SELECT count(*) FROM rejected_readings WHERE meter_id = %(m)s),"
            " (SELECT count(*) FROM security_events"
            "  WHERE meter_id = %(m)s AND type = 'bad_signature')",
            {"m": meter_id},
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


@pytest.mark.parametrize(
    ("deliver", "good"),
    [(True, True), (True, False), (False, True)],
    ids=["committed", "committed-rejections-only", "not-committed"],
)
def test_a_commit_whose_answer_was_lost_is_not_written_or_counted_twice(
    pki: PkiLayout,
    broker: BrokerServer,
    postgres: PostgresServer,
    database_url: str,
    meter_id: str,
    deliver: bool,
    good: bool,
) -> None:
    """The batch commits, the answer is lost, the worker retries on a new connection:
    the retry found its own readings stored and called them `duplicate` (receipt, not
    counted as accepted, no latency), and wrote the batch's rejections again (the rows,
    the security events, and so the quarantine's count, twice). A COMMIT that never
    reached the server is written by the retry, once."""
    key = provision(pki, database_url, meter_id)
    cutter = CommitCutter(
        postgres.port, lambda: any(_written(database_url, meter_id)), deliver=deliver
    )

    async def scenario() -> tuple[list[tuple[Any, ...]], float]:
        async with cutter.serving(database_url) as via_proxy:
            settings = worker_settings(
                pki=pki, port=broker.port, database_url=via_proxy, redis_url=None,
                batch_linger_ms=500, retry_initial_s=0.1,
            )  # fmt: skip
            accepted = ACCEPTED._value.get()
            async with running_worker(settings):
                (meter,) = await _meters(pki, broker.port, [meter_id], {meter_id: key})
                cutter.armed = True
                if good:
                    meter.publish(meter.reading(1, imp=1))
                meter.publish(meter.reading(2, imp=2).model_copy(update={"export_wh": 10**6}))
                receipts = await meter.wait_receipts(1 + good)
                await meter.close()
        statuses = [(r["seq"], r["status"], r["reason"]) for r in receipts]
        return statuses, ACCEPTED._value.get() - accepted

    statuses, accepted = asyncio.run(scenario())
    forged = (2, "rejected", "bad_signature")
    assert (cutter.cuts, statuses, accepted, _written(database_url, meter_id)) == (
        1,
        [(1, "accepted", None), forged] if good else [forged],
        1 if good else 0,
        (1 if good else 0, 1, 1),
    )


@contextlib.asynccontextmanager
async def _worker_behind(
    proxy: SilentProxy, pki: PkiLayout, broker: BrokerServer, database_url: str
) -> AsyncIterator[None]:
    """A worker whose every database connection goes through `proxy`; it gives a wait on
    the database up after 1 s."""
    async with proxy.serving(database_url) as via:
        settings = worker_settings(
            pki=pki, port=broker.port, database_url=via, redis_url=None, retry_initial_s=0.1,
            database_timeout_s=1,
        )  # fmt: skip
        async with running_worker(settings):
            yield


def test_a_database_that_goes_silent_holds_no_reading_for_ever(
    pki: PkiLayout,
    broker: BrokerServer,
    postgres: PostgresServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    """Every connection the worker holds stops answering and stays open (a primary's host
    lost without a reset; a failover's new primary takes new connections): the store's
    transaction and a new meter's key lookup waited on their sockets for ever, nothing
    stored, no receipt, and the worker did not stop either. Each is given up after
    `database_timeout_s` and tried again on a new connection."""
    known, new = make_meter_id(), make_meter_id()
    keys = {m: provision(pki, database_url, m) for m in (known, new)}
    proxy = SilentProxy(postgres.port)

    async def scenario() -> list[list[tuple[int, str]]]:
        async with _worker_behind(proxy, pki, broker, database_url):
            first, second = await _meters(pki, broker.port, [known, new], keys)
            first.publish(first.reading(1, imp=1))
            await first.wait_receipts(1)
            proxy.silence()
            first.publish(first.reading(2, imp=2))
            second.publish(second.reading(1, imp=1))
            receipts = [await m.wait_receipts(n) for m, n in ((first, 2), (second, 1))]
            await first.close()
            await second.close()
        return [[(r["seq"], r["status"]) for r in got] for got in receipts]

    assert asyncio.run(scenario()) == [[(1, "accepted"), (2, "accepted")], [(1, "accepted")]]
    assert stored_counts(database_url, [known, new]) == {(known, 1): 1, (known, 2): 1, (new, 1): 1}


def test_a_key_retired_while_the_registry_listen_went_silent_is_refused(
    pki: PkiLayout,
    broker: BrokerServer,
    postgres: PostgresServer,
    database_url: str,
    meter_id: str,
) -> None:
    """The worker's LISTEN connection goes silent, then the meter's key is retired: the
    notification never came, and the cached key verified the meter's readings until the
    cache's TTL (an hour by default). The listen is probed, found silent and made again,
    and the cache dropped with it."""
    key = provision(pki, database_url, meter_id)
    proxy = SilentProxy(postgres.port)

    async def scenario() -> list[tuple[int, str, str | None]]:
        async with _worker_behind(proxy, pki, broker, database_url):
            (meter,) = await _meters(pki, broker.port, [meter_id], {meter_id: key})
            meter.publish(meter.reading(1, imp=1))
            await meter.wait_receipts(1)
            proxy.silence()
            with psycopg.connect(database_url, autocommit=True) as conn:
                new_pem = generate_private_key("EdDSA").public_key().pem()
                rotate_key(conn, meter_id, NewKey.parse("EdDSA", new_pem), overlap=timedelta(0))
            seq = 1
            deadline = time.monotonic() + 15
            while meter.receipts[-1]["status"] == "accepted" and time.monotonic() < deadline:
                seq += 1
                meter.publish(meter.reading(seq, imp=seq))
                await meter.wait_receipts(seq)
                await asyncio.sleep(0.5)
            await meter.close()
        return [(r["seq"], r["status"], r.get("reason")) for r in meter.receipts]

    receipts = asyncio.run(scenario())
    assert receipts[-1][1:] == ("rejected", "bad_signature"), receipts
