"""PostgreSQL failover with the real Patroni/etcd cluster (tests/fixtures/ha.py) under an
ingest worker's load: kill -9 of the primary's postmaster, a planned switchover and the
loss of an etcd member. Each time the worker finds the primary again by itself through
the multi-host URL, and the audit holds: every reading stored exactly once, every
reading receipted, no receipt for anything not stored.

The kill is the case synchronous replication exists for: a reading receipted before the
kill must be on the new primary, or its meter, holding a receipt, never sends it again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import pytest
from ingest_harness import (
    ProbeMeter,
    audit_exactly_once,
    provision,
    running_worker,
    stored_counts,
    stream_readings,
    until_stored,
    worker_settings,
)
from waiting import async_wait_until, wait_until

from meterproof.certs.layout import PkiLayout
from meterproof.stack.broker import BrokerServer
from meterproof.stack.ha import HaCluster
from meterproof.stack.redis import RedisServer

pytestmark = pytest.mark.slow

METERS = 3
READINGS = 100
INTERVAL_S = 0.05
#: Issue 16's goal, from the kill to the first reading stored on the new primary.
FAILOVER_GOAL_S = 15.0


@dataclass(frozen=True, slots=True)
class Loaded:
    """What a stream of readings through one fault left behind."""

    ids: list[str]
    fault_at: float  #: wall clock, as PostgreSQL's stored_at
    #: (meter_id, seq) receipted before the fault, and every receipt with its status.
    receipted_before: set[tuple[str, int]]
    receipts: list[tuple[str, int, str]]


def _receipted(meters: list[ProbeMeter]) -> set[tuple[str, int]]:
    return {(m.meter_id, int(r["seq"])) for m in meters for r in m.receipts}


#: Runs a stream of readings through one fault (the `through_fault` fixture).
ThroughFault = Callable[[Callable[[], object]], Loaded]


@pytest.fixture
def through_fault(
    ha_cluster: HaCluster,
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    make_meter_id: Callable[[], str],
) -> ThroughFault:
    def run(fault: Callable[[], object]) -> Loaded:
        return _through_fault(ha_cluster, pki, broker, redis_server.url, make_meter_id, fault)

    return run


def _through_fault(
    cluster: HaCluster,
    pki: PkiLayout,
    broker: BrokerServer,
    redis_url: str,
    make_meter_id: Callable[[], str],
    fault: Callable[[], object],
) -> Loaded:
    """Meters stream readings to a worker on the cluster's URL; `fault` hits once the
    worker has committed some; then until every reading is stored and receipted."""
    ids = [make_meter_id() for _ in range(METERS)]
    keys = {m: provision(pki, cluster.url, m) for m in ids}
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=cluster.url, redis_url=redis_url
    )
    t0 = int(time.time() * 1000) - 3_600_000

    async def scenario() -> Loaded:
        async with running_worker(settings) as worker:
            meters = [ProbeMeter(m, keys[m], pki, broker.port) for m in ids]
            for m in meters:
                await m.connect()
            stream = asyncio.create_task(stream_readings(meters, READINGS, INTERVAL_S, t0))
            await async_wait_until(lambda: worker.committed >= 30, what="readings committed")
            before = _receipted(meters)
            fault_at = time.time()
            await asyncio.to_thread(fault)
            sent = await stream
            await async_wait_until(
                lambda: asyncio.to_thread(cluster.primary), what="a primary", within_s=60
            )
            await until_stored(cluster.url, meters, sent, 60)
            await async_wait_until(
                lambda: len(_receipted(meters)) >= len(sent), what="every reading receipted"
            )
            receipts = [
                (m.meter_id, int(r["seq"]), str(r["status"])) for m in meters for r in m.receipts
            ]
            for m in meters:
                await m.close()
        return Loaded(ids, fault_at, before, receipts)

    return asyncio.run(scenario())


def _audit(cluster: HaCluster, loaded: Loaded) -> None:
    """Stored exactly once, receipted, and nothing receipted that is not stored."""
    audit_exactly_once(cluster.url, loaded.ids, READINGS)
    stored = set(stored_counts(cluster.url, loaded.ids))
    receipted = {(m, s) for m, s, _ in loaded.receipts}
    assert receipted == stored, f"receipted but not stored: {sorted(receipted - stored)[:3]}"
    assert loaded.receipted_before <= stored
    statuses = {status for _, _, status in loaded.receipts}
    assert statuses <= {"accepted", "duplicate"}, statuses


def _first_stored_after(cluster: HaCluster, loaded: Loaded) -> float:
    """Seconds from the fault to the first of these readings stored after it."""
    with psycopg.connect(cluster.url) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM min(stored_at)) FROM readings"
            " WHERE meter_id = ANY(%s) AND stored_at > to_timestamp(%s)",
            (loaded.ids, loaded.fault_at),
        ).fetchone()
    first = None if row is None else row[0]
    assert first is not None, "nothing stored after the fault"
    return float(first) - loaded.fault_at


def _longest_pause(cluster: HaCluster, loaded: Loaded) -> float:
    """The pipeline's unavailability window: the longest time between two of these
    readings' transactions (a reading every ~17 ms while the stream runs)."""
    with psycopg.connect(cluster.url) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM max(gap)) FROM (SELECT stored_at - lag(stored_at)"
            " OVER (ORDER BY stored_at) AS gap FROM readings WHERE meter_id = ANY(%s)) AS g",
            (loaded.ids,),
        ).fetchone()
    assert row is not None
    return float(row[0])


def test_primary_killed_under_load_fails_over_and_loses_nothing(
    ha_cluster: HaCluster, through_fault: ThroughFault
) -> None:
    ha_cluster.wait_replicated()
    old, standby = ha_cluster.primary(), ha_cluster.standby()
    assert old is not None
    assert standby is not None
    loaded = through_fault(old.kill_postgres)
    assert ha_cluster.primary() is standby, "the synchronous standby did not take over"
    _audit(ha_cluster, loaded)
    assert loaded.receipted_before, "the kill came before any receipt"
    failover_s = _first_stored_after(ha_cluster, loaded)
    pause_s = _longest_pause(ha_cluster, loaded)
    print(f"kill -9 of the primary: first reading stored {failover_s:.2f} s later;", end=" ")
    print(f"pause {pause_s:.2f} s")
    assert failover_s < FAILOVER_GOAL_S
    # The crashed node comes back as the new primary's synchronous standby (pg_rewind).
    ha_cluster.wait_replicated(timeout=60)


def test_planned_switchover_under_load_loses_nothing(
    ha_cluster: HaCluster, through_fault: ThroughFault
) -> None:
    ha_cluster.wait_replicated(timeout=60)
    standby = ha_cluster.standby()
    assert standby is not None
    loaded = through_fault(ha_cluster.switchover)
    assert ha_cluster.primary() is standby
    _audit(ha_cluster, loaded)
    print(f"switchover: pause {_longest_pause(ha_cluster, loaded):.2f} s")
    ha_cluster.wait_replicated(timeout=60)


def test_etcd_member_lost_under_load_changes_nothing(
    ha_cluster: HaCluster, through_fault: ThroughFault
) -> None:
    """Two of three members keep the quorum: the leader key stays, the primary stays."""
    ha_cluster.wait_replicated(timeout=60)
    primary = ha_cluster.primary()
    member = ha_cluster.etcd[0]
    loaded = through_fault(member.kill)
    assert not member.is_running()
    assert ha_cluster.primary() is primary
    _audit(ha_cluster, loaded)
    print(f"etcd member lost: pause {_longest_pause(ha_cluster, loaded):.2f} s")
    member.start()
    wait_until(lambda: all(m.healthy() for m in ha_cluster.etcd), what="etcd healthy again")
    ha_cluster.wait_replicated()
