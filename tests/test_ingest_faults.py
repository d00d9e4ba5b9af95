"""Nothing lost, nothing twice: a stream of readings through worker kills and outages of
the broker, PostgreSQL and Redis, audited by (meter_id, seq) in the database."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from ingest_harness import (
    ProbeMeter,
    WorkerProcess,
    provision,
    running_worker,
    stored_counts,
    worker_settings,
)

from meterproof.certs.layout import PkiLayout
from meterproof.schemas.reading import SignedReading
from meterproof.stack.broker import BrokerServer
from meterproof.stack.postgres import PostgresServer
from meterproof.stack.redis import RedisServer

pytestmark = pytest.mark.slow

METERS = 3


#: As the reference meter does (meter/delivery.py): a reading with no receipt this long
#: after it was sent goes out again. The broker may take a reading (PUBACK) and lose it
#: in a restart before any worker has it; only the meter's republish brings it home.
REPUBLISH_AFTER_S = 5.0


async def _stream(
    meters: list[ProbeMeter], count: int, interval_s: float, t0: int
) -> dict[tuple[str, int], SignedReading]:
    """What a meter does: one reading after another; while offline it waits (buffers).
    Returns what was sent, for `_until_stored` to republish."""
    sent: dict[tuple[str, int], SignedReading] = {}
    for seq in range(1, count + 1):
        for m in meters:
            while not m.connected:  # noqa: ASYNC110 - gmqtt offers a flag, not an event
                await asyncio.sleep(0.05)
            reading = m.reading(seq, ts=t0 + seq * 1_000, imp=seq, exp=seq // 2)
            m.publish(reading)
            sent[m.meter_id, seq] = reading
        await asyncio.sleep(interval_s)
    return sent


async def _until_stored(
    database_url: str,
    meters: list[ProbeMeter],
    sent: dict[tuple[str, int], SignedReading],
    within_s: float,
) -> None:
    """Until every reading is stored, republishing the unreceipted ones as a meter does."""
    ids = [m.meter_id for m in meters]
    deadline = time.monotonic() + within_s
    republish_at = time.monotonic() + REPUBLISH_AFTER_S
    while time.monotonic() < deadline:
        counts = await asyncio.to_thread(stored_counts, database_url, ids)
        if len(counts) >= len(sent):
            return
        if time.monotonic() >= republish_at:
            for m in meters:
                receipted = {r["seq"] for r in m.receipts}
                for (meter_id, seq), reading in sent.items():
                    if meter_id == m.meter_id and seq not in receipted and m.connected:
                        m.publish(reading)
            republish_at = time.monotonic() + REPUBLISH_AFTER_S
        await asyncio.sleep(0.25)


def _audit(database_url: str, ids: list[str], count: int) -> None:
    counts = stored_counts(database_url, ids)
    missing = {(m, s) for m in ids for s in range(1, count + 1)} - set(counts)
    assert not missing, f"lost {len(missing)} readings, e.g. {sorted(missing)[:3]}"
    twice = {k: n for k, n in counts.items() if n != 1}
    assert not twice, f"stored more than once: {twice}"
    assert len(counts) == len(ids) * count


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
            stream = asyncio.create_task(_stream(meters, count, 0.05, t0))
            await asyncio.sleep(0.5)
            await fault()
            sent = await stream
            await _until_stored(database_url, meters, sent, drain_s)
            for m in meters:
                await m.close()

    asyncio.run(scenario())
    _audit(database_url, ids, count)


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
        stream = asyncio.create_task(_stream(meters, count, 0.05, t0))
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
            await _until_stored(database_url, meters, sent, 60)
        finally:
            await asyncio.to_thread(worker.stop)
            for m in meters:
                await m.close()

    asyncio.run(scenario())
    assert kills == 3
    _audit(database_url, ids, count)


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
