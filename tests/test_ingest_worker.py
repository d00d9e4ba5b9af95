"""The worker end to end: real Mosquitto (TLS, our ACL), PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fixtures.servers import refusing_ingest_clients
from ingest_harness import (
    PassThroughSource,
    ProbeMeter,
    provision,
    puback_reason,
    running_worker,
    stored_counts,
    worker_settings,
)
from structlog.testing import capture_logs
from waiting import async_wait_until, wait_until

from meterproof.certs.identities import ingest_identity
from meterproof.certs.layout import PkiLayout
from meterproof.config import new_share_group
from meterproof.ingest import telemetry
from meterproof.ingest.cli import _Restarts
from meterproof.ingest.records import Message
from meterproof.ingest.settings import IngestSettings
from meterproof.ingest.source import Delivery, Handler, mqtt_source
from meterproof.ingest.worker import Worker, postgres_store
from meterproof.mosquitto.config import BrokerFiles
from meterproof.registry import repository
from meterproof.registry.model import MeterStatus
from meterproof.stack.broker import BrokerServer
from meterproof.stack.process import free_port
from meterproof.stack.redis import RedisServer

VECTORS = Path(__file__).parent.parent / "schemas" / "vectors"
REJECTIONS: dict[str, Any] = json.loads((VECTORS / "rejections.json").read_text())


def _events(database_url: str, meter_id: str) -> Counter[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT type FROM security_events WHERE meter_id = %s", (meter_id,)
        ).fetchall()
    return Counter(str(r[0]) for r in rows)


class WithUnroutable(PassThroughSource):
    """The real source, plus messages on topics the broker lets no identity publish on,
    delivered as a compromised broker could (QoS 0: nothing to acknowledge)."""

    def __init__(self, settings: IngestSettings) -> None:
        super().__init__(settings)
        self._deliver: Handler | None = None
        self.committed: list[Delivery] = []

    async def start(self, deliver: Handler) -> None:
        self._deliver = deliver
        await super().start(deliver)

    def inject(self, message: Message) -> Delivery:
        assert self._deliver is not None
        delivery = Delivery(message, None, 0)
        self._deliver(delivery)
        return delivery

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        batch = list(deliveries)
        self.committed += batch  # the worker acknowledges only what it committed
        return super().ack(batch)


@pytest.mark.slow
def test_every_rejection_vector_through_a_running_worker(
    pki: PkiLayout, broker: BrokerServer, redis_server: RedisServer, database_url: str
) -> None:
    """Each vector from the identity that may publish on its topic; the two topics no
    certificate can own are refused by the broker, and delivered by an injected source."""
    meter_id = REJECTIONS["meter_id"]
    own_topic = f"meters/{meter_id}/readings"
    provision(pki, database_url, meter_id, public_key_pem=REJECTIONS["public_key_pem"])
    other = "SM2025-ENG-001-ABC123"
    provision(pki, database_url, other)
    with psycopg.connect(database_url, autocommit=True) as conn:  # keys valid at vector time
        conn.execute("UPDATE meter_keys SET valid_from = '2025-01-01'")
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url,
        quarantine_failures=1000,
    )  # fmt: skip
    cases = REJECTIONS["cases"]
    by_broker = [c for c in cases if c["topic"] in (own_topic, f"meters/{other}/readings")]
    unroutable = [c for c in cases if c not in by_broker]
    assert len(unroutable) == 2
    before = {
        r: telemetry.REJECTED.labels(reason=r)._value.get() for r in {c["reason"] for c in cases}
    }

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
        source = WithUnroutable(settings)
        clock = lambda: REJECTIONS["server_time_ms"]  # noqa: E731
        async with running_worker(settings, clock=clock, source=source):
            meter = ProbeMeter(meter_id, None, pki, broker.port)
            mismatch = ProbeMeter(other, None, pki, broker.port)
            await meter.connect()
            await mismatch.connect()
            refused = [
                await asyncio.to_thread(
                    puback_reason, pki, meter_id, broker.port, c["topic"], c["payload"].encode()
                )
                for c in unroutable
            ]
            for case in by_broker:
                sender = meter if case["topic"] == own_topic else mismatch
                sender.publish(case["payload"].encode(), topic=case["topic"])
            now = REJECTIONS["server_time_ms"]
            injected = [
                source.inject(Message(c["topic"], c["payload"].encode(), now)) for c in unroutable
            ]
            await async_wait_until(
                lambda: all(d in source.committed for d in injected),
                what="the injected messages committed",
            )
            own = await meter.wait_receipts(len(by_broker) - 1)
            theirs = await mismatch.wait_receipts(1)
            await meter.close()
            await mismatch.close()
            return own, theirs, refused

    own, theirs, refused = asyncio.run(scenario())
    assert refused == [135, 135], "the ACL refuses topics no identity owns (PUBACK 135)"
    receipts = own + theirs
    assert all(r["status"] == "rejected" for r in receipts)
    assert Counter(r["reason"] for r in receipts) == Counter(c["reason"] for c in by_broker)
    expected = Counter(c["reason"] for c in cases)
    with psycopg.connect(database_url) as conn:
        stored = Counter(
            str(r[0]) for r in conn.execute("SELECT reason FROM rejected_readings").fetchall()
        )
    assert stored == expected
    for reason, n in expected.items():
        assert telemetry.REJECTED.labels(reason=reason)._value.get() - before[reason] == n
    events = _events(database_url, meter_id)
    assert events["bad_signature"] == expected["bad_signature"]
    assert events["unsupported_alg"] == expected["unsupported_alg"]
    assert _events(database_url, other)["topic_mismatch"] == 1


def test_the_remaining_reasons_accept_and_duplicate(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    good, unknown, inactive = make_meter_id(), make_meter_id(), make_meter_id()
    key = provision(pki, database_url, good)
    provision(pki, None, unknown)
    provision(pki, database_url, inactive, status=MeterStatus.INACTIVE)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url,
        rate_max_readings=3, rate_window_s=60,
    )  # fmt: skip
    t0 = int(time.time() * 1000) - 60_000

    async def scenario() -> dict[str, list[dict[str, Any]]]:
        async with running_worker(settings):
            meters = {m: ProbeMeter(m, k, pki, broker.port) for m, k in
                      ((good, key), (unknown, provision(pki, None, unknown)),
                       (inactive, provision(pki, None, inactive)))}  # fmt: skip
            for m in meters.values():
                await m.connect()
            g = meters[good]
            first = g.reading(1, ts=t0, imp=100, exp=10)
            g.publish(first)
            await g.wait_receipts(1)
            g.publish(first)  # duplicate
            g.publish(g.reading(1, ts=t0, imp=101, exp=10))  # seq_reused
            g.publish(g.reading(2, ts=t0 + 5_000, imp=99, exp=10))  # register_decreased
            g.publish(g.reading(3, ts=t0 + 10_000, imp=102, exp=11))  # accepted
            g.publish(g.reading(4, ts=t0 + 15_000, imp=103, exp=12))  # accepted (3rd in window)
            g.publish(g.reading(5, ts=t0 + 20_000, imp=104, exp=13))  # rate_limited
            meters[unknown].publish(meters[unknown].reading(1))
            meters[inactive].publish(meters[inactive].reading(1))
            out = {}
            for m, expected in ((good, 7), (unknown, 1), (inactive, 1)):
                out[m] = await meters[m].wait_receipts(expected)
                await meters[m].close()
            return out

    receipts = asyncio.run(scenario())
    statuses = [(r["status"], r["reason"]) for r in receipts[good]]
    assert statuses == [
        ("accepted", None),
        ("duplicate", None),
        ("rejected", "seq_reused"),
        ("rejected", "register_decreased"),
        ("accepted", None),
        ("accepted", None),
        ("rejected", "rate_limited"),
    ]
    assert receipts[unknown][0]["reason"] == "unknown_meter"
    assert receipts[inactive][0]["reason"] == "meter_not_active"
    assert stored_counts(database_url, [good]) == {(good, 1): 1, (good, 3): 1, (good, 4): 1}
    events = _events(database_url, good)
    assert events["seq_reused"] == 1
    assert events["register_decreased"] == 1
    assert events["rate_limited"] == 1


def test_two_workers_on_one_shared_subscription_store_each_reading_once(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    ids = [make_meter_id() for _ in range(4)]
    keys = {m: provision(pki, database_url, m) for m in ids}
    first = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url
    )
    second = worker_settings(  # its own certificate: one connection per certificate
        pki=pki,
        port=broker.port,
        database_url=database_url,
        redis_url=redis_server.url,
        share_group=first.share_group,
    )
    per_meter = 50
    t0 = int(time.time() * 1000) - 3_600_000

    async def scenario() -> tuple[int, int]:
        async with running_worker(first) as a, running_worker(second) as b:
            meters = [ProbeMeter(m, keys[m], pki, broker.port) for m in ids]
            for m in meters:
                await m.connect()
            for seq in range(1, per_meter + 1):
                for m in meters:
                    m.publish(m.reading(seq, ts=t0 + seq * 5_000, imp=seq, exp=seq))
            for m in meters:
                await m.wait_receipts(per_meter, within_s=30)
                await m.close()
            return a.committed, b.committed

    committed_a, committed_b = asyncio.run(scenario())
    assert committed_a > 0
    assert committed_b > 0, "the shared subscription should split the load"
    counts = stored_counts(database_url, ids)
    assert len(counts) == len(ids) * per_meter
    assert set(counts.values()) == {1}


@pytest.mark.slow
def test_quarantine_reaches_a_running_worker_within_a_second(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    meter_id: str,
) -> None:
    key = provision(pki, database_url, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url,
        key_cache_ttl_s=3600,
    )  # fmt: skip

    async def scenario() -> list[dict[str, Any]]:
        async with running_worker(settings):
            meter = ProbeMeter(meter_id, key, pki, broker.port)
            await meter.connect()
            meter.publish(meter.reading(1, imp=1))
            await meter.wait_receipts(1)
            with psycopg.connect(database_url, autocommit=True) as conn:
                repository.set_status(conn, meter_id, MeterStatus.QUARANTINED, reason="test")
            await asyncio.sleep(1.0)
            meter.publish(meter.reading(2, imp=2))
            receipts = await meter.wait_receipts(2)
            await meter.close()
            return receipts

    receipts = asyncio.run(scenario())
    assert receipts[0]["status"] == "accepted"
    assert receipts[1]["reason"] == "meter_not_active"


def test_repeated_bad_signatures_quarantine_the_meter(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    meter_id: str,
) -> None:
    key = provision(pki, database_url, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url,
        quarantine_failures=5,
    )  # fmt: skip

    async def scenario() -> list[dict[str, Any]]:
        async with running_worker(settings):
            meter = ProbeMeter(meter_id, key, pki, broker.port)
            await meter.connect()
            for seq in range(1, 9):
                forged = meter.reading(seq, imp=seq).model_copy(update={"export_wh": 10**6})
                meter.publish(forged)
                await meter.wait_receipts(seq)
            meter.publish(meter.reading(20, imp=20))  # honest, but the meter is quarantined
            receipts = await meter.wait_receipts(9)
            await meter.close()
            return receipts

    receipts = asyncio.run(scenario())
    reasons = [r["reason"] for r in receipts]
    assert reasons[:5] == ["bad_signature"] * 5
    assert set(reasons[5:]) == {"meter_not_active"}
    with psycopg.connect(database_url) as conn:
        status = conn.execute(
            "SELECT status::text FROM meters WHERE meter_id = %s", (meter_id,)
        ).fetchone()
        critical = conn.execute(
            "SELECT count(*) FROM security_events WHERE meter_id = %s AND type = 'quarantined'"
            " AND severity = 'critical'",
            (meter_id,),
        ).fetchone()
    assert status == ("quarantined",)
    assert critical == (1,)


@pytest.mark.slow
def test_health_readiness_and_metrics_endpoints(
    pki: PkiLayout, broker: BrokerServer, redis_server: RedisServer, database_url: str
) -> None:
    from urllib.error import HTTPError
    from urllib.request import urlopen

    from meterproof.probes import serve_probes

    port = free_port()
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url
    )

    def get(path: str) -> tuple[int, str]:
        try:
            with urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except HTTPError as exc:
            return exc.code, ""

    async def scenario() -> tuple[tuple[int, str], ...]:
        async with running_worker(settings) as worker:
            probes = serve_probes("127.0.0.1", port, ready=worker.ready)
            assert probes is not None
            try:
                ready = await asyncio.to_thread(get, "/readyz")
                metrics = await asyncio.to_thread(get, "/metrics")
                health = await asyncio.to_thread(get, "/healthz")
                worker.stopping.set()
                await async_wait_until(lambda: not worker.ready(), what="the worker stops")
                stopping = await asyncio.to_thread(get, "/readyz")
            finally:
                probes.close()
            return ready, metrics, health, stopping

    ready, metrics, health, stopping = asyncio.run(scenario())
    assert ready[0] == 200
    assert health[0] == 200
    assert stopping[0] == 503, "a worker that stopped taking work must not look ready"
    for name in (
        "meterproof_readings_received_total",
        "meterproof_readings_rejected_total",
        "energy_signature_verification_failures_total",
        "oracle_latency_seconds",
        "meterproof_batch_commit_seconds",
        "meterproof_queue_depth_messages",
        "meterproof_replay_checks_total",
    ):
        assert name in metrics[1], name


@pytest.mark.slow
def test_workers_whose_metrics_ports_would_pass_65535_are_refused_at_start(
    pki: PkiLayout, tmp_path: Path
) -> None:
    """Worker i serves /metrics on metrics_port + i: one past 65535 refused its settings at
    every restart, and the supervisor restarted it for ever."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERPROOF_")}
    env |= {
        "METERPROOF_PKI_ROOT": str(pki.root),
        "METERPROOF_SHARE_GROUP": new_share_group(),
        "METERPROOF_DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
        "METERPROOF_MQTT_PORT": "1",
        "METERPROOF_METRICS_PORT": "65535",
        "METERPROOF_BROKER_LOST_EXIT_S": "3",
    }
    done = subprocess.run(
        [sys.executable, "-P", "-m", "meterproof", "ingest", "--workers", "2"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert b"65536" in done.stderr
    assert done.stderr.count(b"\n") == 1


def test_a_worker_that_keeps_dying_is_restarted_later_each_time() -> None:
    """The supervisor's restarts double from 0.2 s to 30 s (it restarted at once, for
    ever: a broker that refused the workers had them started five times a second), and
    start from 0.2 s again once a worker ran for 10 s (a kill -9, a broker lost for a
    minute)."""
    now = [0.0]
    restarts = _Restarts(clock=lambda: now[0])
    delays = []
    for _ in range(10):
        restarts.started("ingest-0")
        now[0] += 1.0
        delays.append(restarts.died("ingest-0"))
        assert restarts.due() == []
        now[0] += delays[-1]
        assert restarts.due() == ["ingest-0"]
        assert restarts.due() == []
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]
    restarts.started("ingest-0")
    now[0] += 10.0
    assert restarts.died("ingest-0") == 0.2


@pytest.fixture
def refusing_broker(
    misconfigured_broker: Callable[[Callable[[BrokerFiles], None]], BrokerServer],
) -> BrokerServer:
    """The project's broker refusing the ingest identities: CONNACK 0x87, not authorized."""
    return misconfigured_broker(refusing_ingest_clients)


@pytest.mark.slow
def test_a_broker_that_refuses_the_worker_for_good_ends_it_after_one_attempt(
    pki: PkiLayout, refusing_broker: BrokerServer, database_url: str
) -> None:
    """No retry can change "not authorized": the worker ends with exit code 1 and one log
    line naming the reason code, after one attempt (gmqtt does not connect again by
    itself). gmqtt's error escaped the worker before, a traceback with its tasks left
    running."""
    settings = worker_settings(
        pki=pki, port=refusing_broker.port, database_url=database_url, redis_url=None,
        identity=ingest_identity(0),
    )  # fmt: skip
    log = refusing_broker.files.log
    offset = log.stat().st_size

    async def scenario() -> Worker:
        worker = Worker(
            settings, source=mqtt_source(settings), store_factory=postgres_store(settings)
        )
        await asyncio.wait_for(worker.run(), 20)
        await asyncio.sleep(2)  # gmqtt's own reconnect would come 1 s after the refusal
        return worker

    with capture_logs() as logs:
        worker = asyncio.run(scenario())
    assert worker.exit_code == 1
    (refused,) = [e for e in logs if e["event"] == "broker_refused_exiting"]
    assert refused["reason_code"] == 0x87
    assert "worker_started" not in [e["event"] for e in logs]
    assert log.read_bytes()[offset:].count(b"New connection from") == 1


@pytest.mark.slow
def test_workers_refused_by_their_broker_are_restarted_with_backoff(
    pki: PkiLayout, refusing_broker: BrokerServer, database_url: str, tmp_path: Path
) -> None:
    """`--workers 2` against a broker that refuses them: each worker exits 1 with the reason
    code, the supervisor starts it again later each time, and SIGTERM ends it all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERPROOF_")}
    env |= {
        "METERPROOF_PKI_ROOT": str(pki.root),
        "METERPROOF_SHARE_GROUP": new_share_group(),
        "METERPROOF_DATABASE_URL": database_url,
        "METERPROOF_MQTT_PORT": str(refusing_broker.port),
        "METERPROOF_METRICS_PORT": "0",
    }
    out = tmp_path / "ingest.log"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "meterproof", "ingest", "--workers", "2"],
            env=env, cwd=tmp_path, stdout=sink, stderr=sink,
        )  # fmt: skip

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]

    def restarts() -> list[dict[str, Any]]:
        return [e for e in lines() if e["event"] == "worker_died_restarting"]

    try:
        wait_until(lambda: len(restarts()) >= 6, what="three restarts of each", within_s=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0
    assert "Traceback" not in out.read_text()
    refusals = [e for e in lines() if e["event"] == "broker_refused_exiting"]
    assert {e["reason_code"] for e in refusals} == {0x87}
    for identity in (ingest_identity(0), ingest_identity(1)):
        mine = [e for e in restarts() if e["identity"] == identity]
        assert [e["exit_code"] for e in mine[:3]] == [1, 1, 1]
        assert [e["restart_in_s"] for e in mine[:3]] == [0.2, 0.4, 0.8]


def test_oracle_latency_runs_to_the_commit_not_to_the_verification(
    pki: PkiLayout,
    broker: BrokerServer,
    database_url: str,
    meter_id: str,
) -> None:
    """`oracle_latency_seconds` is from a reading's ts to its commit; it was measured to
    the batch's verification, so the time a batch waited for the database (a lock, an
    outage and its retries) never showed in it."""
    key = provision(pki, database_url, meter_id)
    settings = worker_settings(pki=pki, port=broker.port, database_url=database_url, redis_url=None)
    held_s = 2.0

    async def scenario() -> float:
        before = telemetry.ORACLE_LATENCY._sum.get()
        async with running_worker(settings):
            meter = ProbeMeter(meter_id, key, pki, broker.port)
            await meter.connect()
            with psycopg.connect(database_url) as holder:  # the commit waits for it
                holder.execute("SELECT 1 FROM meters WHERE meter_id = %s FOR UPDATE", (meter_id,))
                meter.publish(meter.reading(1, imp=1))
                await async_wait_until(
                    lambda: asyncio.to_thread(_waiting_for_a_lock, database_url),
                    what="the batch waits",
                )
                await asyncio.sleep(held_s)
            (receipt,) = await meter.wait_receipts(1)
            await meter.close()
        assert receipt["status"] == "accepted"
        return telemetry.ORACLE_LATENCY._sum.get() - before

    assert asyncio.run(scenario()) >= held_s


def _waiting_for_a_lock(database_url: str) -> bool:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return row is not None and row[0] > 0
