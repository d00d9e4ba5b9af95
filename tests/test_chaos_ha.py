"""The cluster faults of `chaos --ha` against the real Patroni cluster and broker pair
(tests/fixtures/ha.py): a failover the pipeline never shows is a fault not recovered, not
one done, whatever the backlog says afterwards. No worker runs, so nothing is stored
after a kill unless the test stores it; a fault that finds its server already down did
not happen."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from meterproof.chaos.faults import FaultRecord, Injector, Target
from meterproof.chaos.plan import PRIMARY_PAUSED_S, FaultKind, PlannedFault, quick_config
from meterproof.stack.broker import BrokerServer
from meterproof.stack.ha import HaCluster

pytestmark = pytest.mark.slow

METERS = 2
#: Short: the tests wait it out when nothing comes through.
TIMEOUT_S = 2.0


def _injector(cluster: HaCluster, brokers: list[BrokerServer], state_root: Path) -> Injector:
    """Empty meter outboxes under `state_root`: the ingest backlog counts as drained."""
    config = quick_config(ha=True, meters=METERS, recovery_timeout_s=TIMEOUT_S)
    target = Target(
        config, cluster, None, brokers[0], None, None, state_root, cluster.url, tuple(brokers)
    )
    return Injector(target, load_started=time.time(), rng=random.Random(1))


def _store_later(cluster: HaCluster, meters: int) -> None:
    """One reading per meter, stamped as stored an hour from now: after any kill."""
    ts = datetime.now(UTC)
    with psycopg.connect(cluster.url, autocommit=True) as conn:
        for n in range(meters):
            meter_id = f"chaos-ha-{n}-{time.time_ns()}"
            conn.execute("INSERT INTO meters (meter_id) VALUES (%s)", (meter_id,))
            conn.execute(
                "INSERT INTO reading_log (meter_id, seq, reading_hash, ts, import_wh, export_wh,"
                " stored_at) VALUES (%s, 1, %s, %s, 1, 0, now() + interval '1 hour')",
                (meter_id, bytes(32), ts),
            )


def _run(injector: Injector, kind: FaultKind) -> FaultRecord:
    return injector.run(PlannedFault(kind, 0.0))


def test_a_broker_lost_without_every_meter_through_the_other_is_not_recovered(
    ha_cluster: HaCluster, broker_pair: list[BrokerServer], tmp_path: Path
) -> None:
    with psycopg.connect(ha_cluster.url, autocommit=True) as conn:
        conn.execute("TRUNCATE reading_log, meters CASCADE")
    _store_later(ha_cluster, METERS - 1)
    record = _run(_injector(ha_cluster, broker_pair, tmp_path), FaultKind.BROKER_LOST)
    assert broker_pair[0].is_running(), "the lost broker is started again"
    assert record.kills == 1
    assert record.recovery_s is None
    assert "1 of 2 meters did not come through the other broker" in record.note

    _store_later(ha_cluster, 1)
    record = _run(_injector(ha_cluster, broker_pair, tmp_path), FaultKind.BROKER_LOST)
    assert record.recovery_s is not None
    assert record.note.endswith("2 of 2 meters stored through")


def test_a_broker_paused_without_every_meter_through_the_other_is_not_recovered(
    ha_cluster: HaCluster, broker_pair: list[BrokerServer], tmp_path: Path
) -> None:
    """The paused broker is resumed whether or not the fleet came through, and it kills
    nothing."""
    with psycopg.connect(ha_cluster.url, autocommit=True) as conn:
        conn.execute("TRUNCATE reading_log, meters CASCADE")
    _store_later(ha_cluster, METERS - 1)
    first = broker_pair[0]
    record = _run(_injector(ha_cluster, broker_pair, tmp_path), FaultKind.BROKER_PAUSE)
    assert _state(first) != "T", "the paused broker is resumed"
    assert (record.kills, record.recovery_s) == (0, None)
    assert "1 of 2 meters did not come through the other broker" in record.note

    _store_later(ha_cluster, 1)
    record = _run(_injector(ha_cluster, broker_pair, tmp_path), FaultKind.BROKER_PAUSE)
    assert record.recovery_s is not None
    assert record.note == f"{first.name}; 2 of 2 meters stored through"
    assert _state(first) != "T"


def _state(broker: BrokerServer) -> str:
    """The broker's process state letter (T: stopped)."""
    pid = broker.pid()
    assert pid is not None
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_cluster_fault_without_a_synchronous_standby_is_not_injected(
    ha_cluster: HaCluster, broker_pair: list[BrokerServer], tmp_path: Path
) -> None:
    """A cluster whose standby is not back within the recovery timeout gets no fault (there
    is nothing to fail over to), recorded as not done: the campaign goes on to its audit
    instead of ending there, as it did."""
    standby = ha_cluster.standby()
    assert standby is not None
    standby.stop()
    try:
        record = _run(_injector(ha_cluster, broker_pair, tmp_path), FaultKind.SWITCHOVER)
    finally:
        standby.start()
    assert (record.hit, record.kills, record.recovery_s) == (False, 0, None)
    assert record.note.startswith("not injected: a primary and its synchronous standby")
    ha_cluster.wait_replicated(timeout=60)


def test_a_fault_that_finds_its_server_down_did_not_happen(
    ha_cluster: HaCluster, broker_pair: list[BrokerServer], tmp_path: Path
) -> None:
    """A server that died unseen is not killed nor restarted by the fault: no kill, not
    hit, so the fault did not happen (the campaign fails on it); the server is started
    again all the same."""
    injector = _injector(ha_cluster, broker_pair, tmp_path)
    broker = broker_pair[0]
    broker.stop()
    record = _run(injector, FaultKind.BROKER_RESTART)
    assert (record.hit, record.note) == (False, "it was not running")
    assert broker.is_running()

    broker.stop()
    record = _run(injector, FaultKind.BROKER_KILL)
    assert (record.kills, record.note) == (0, "the broker was not running")
    assert broker.is_running()

    broker.stop()
    record = _run(injector, FaultKind.BROKER_LOST)
    assert (record.kills, record.note) == (0, f"{broker.name} was not running")
    assert broker.is_running()

    member = random.Random(1).choice(ha_cluster.etcd)  # the injector's first draw
    member.stop()
    record = _run(injector, FaultKind.ETCD_KILL)
    assert (record.kills, record.note) == (0, f"{member.name} was not running")
    assert member.is_running()


def test_a_primary_kill_without_a_reading_stored_after_it_is_not_recovered(
    ha_cluster: HaCluster, broker_pair: list[BrokerServer], tmp_path: Path
) -> None:
    with psycopg.connect(ha_cluster.url, autocommit=True) as conn:
        conn.execute("TRUNCATE reading_log, meters CASCADE")
    record = _run(_injector(ha_cluster, broker_pair, tmp_path), FaultKind.PRIMARY_KILL)
    assert record.kills == 1
    assert record.recovery_s is None
    assert f"no reading stored within {TIMEOUT_S:g} s of the kill" in record.note
    ha_cluster.wait_replicated()


def test_a_primary_pause_without_a_reading_stored_while_paused_is_not_recovered(
    ha_cluster: HaCluster, broker_pair: list[BrokerServer], tmp_path: Path
) -> None:
    """No worker runs, so nothing is stored while the primary is paused: the failover never
    shows in the pipeline, which is no recovery. The paused node is resumed all the same
    and comes back as the new primary's standby."""
    with psycopg.connect(ha_cluster.url, autocommit=True) as conn:
        conn.execute("TRUNCATE reading_log, meters CASCADE")
    old = ha_cluster.primary()
    record = _run(_injector(ha_cluster, broker_pair, tmp_path), FaultKind.PRIMARY_PAUSE)
    assert (record.kills, record.recovery_s) == (0, None)
    assert f"no reading stored while it was paused ({PRIMARY_PAUSED_S:g} s)" in record.note
    ha_cluster.wait_replicated(timeout=60)
    assert ha_cluster.primary() is not old
