"""Redundant brokers (`stack up --ha`) with real Mosquitto pairs (tests/fixtures/ha.py):
a broker killed with -9 under a fleet of reference meters (the client the simulator and
the P1 reader use) sends them to the other broker while the worker, subscribed on both,
keeps storing; every reading generated is stored exactly once, receipted, and the ledger
over them verifies. A revocation reaches a meter connected to the second broker. And the
API process keeps answering through a kill -9 of the PostgreSQL primary.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import psycopg
import pytest
from click.testing import CliRunner
from fixtures.api import ApiServer
from ingest_harness import end_session, provision, running_worker, stored_counts, worker_settings
from paho.mqtt.enums import CallbackAPIVersion
from test_retention import anchor
from waiting import async_wait_until, wait_until

from meterproof.bridge.cli import ledger
from meterproof.bridge.oracle import load_oracle
from meterproof.certs.cli import certs
from meterproof.certs.layout import PkiLayout
from meterproof.config import StackEnv
from meterproof.meter.client import Broker, ClientSettings, MeterClient
from meterproof.meter.identity import MeterIdentity, client_tls
from meterproof.meter.network import Network
from meterproof.meter.profile import profile_for
from meterproof.schemas import topics
from meterproof.schemas.timestamps import wall_ms
from meterproof.stack.broker import BrokerServer
from meterproof.stack.ha import HaCluster
from meterproof.stack.process import LOOPBACK, free_port
from meterproof.stack.redis import RedisServer

pytestmark = pytest.mark.slow

METERS = 20
READINGS = 25
INTERVAL_S = 0.2
#: Meters reconnect fast and republish an unreceipted reading after 3 s, so the readings
#: the killed broker took (and the receipts it held) come round again within the test.
FAST = ClientSettings(
    reconnect_min_s=0.2, reconnect_max_s=1.0, republish_after_s=3.0, durable=False
)


def _meter(
    pki: PkiLayout, env: StackEnv, network: Network, meter_id: str, state_dir: Path
) -> MeterClient:
    return MeterClient(
        MeterIdentity.load(pki.device(meter_id)),
        broker=Broker.from_env(env),
        state_dir=state_dir / meter_id,
        network=network,
        settings=FAST,
    )


def test_a_broker_killed_under_a_fleet_moves_the_meters_and_loses_nothing(
    pki: PkiLayout,
    broker_pair: list[BrokerServer],
    broker_pair_env: StackEnv,
    database_url: str,
    redis_server: RedisServer,
    make_meter_id: Callable[[], str],
    tmp_path: Path,
) -> None:
    first, second = broker_pair
    env = broker_pair_env
    ids = [make_meter_id() for _ in range(METERS)]
    for meter_id in ids:
        provision(pki, database_url, meter_id)
    settings = worker_settings(
        pki=pki,
        port=first.port,
        database_url=database_url,
        redis_url=redis_server.url,
        mqtt_brokers=env.mqtt_brokers,
    )
    identity = pki.service(settings.identity)
    end_session(pki, identity, second.port)  # a session an earlier test left there
    t0 = wall_ms() - 3_600_000
    generated: set[tuple[str, int]] = set()
    # The bridge's identity on the second broker: verified readings of readings that
    # arrived on the first reach it (workers publish them on every broker).
    on_second = _Listener(pki, "bridge", second.port, topics.VERIFIED_ALL)

    async def scenario() -> tuple[list[MeterClient], float]:
        async with running_worker(settings) as worker, Network() as network:
            meters = [_meter(pki, env, network, m, tmp_path) for m in ids]
            for meter in meters:
                meter.start()
            await async_wait_until(lambda: all(m.connected for m in meters), what="meters up")
            assert {m.on_broker for m in meters} == {(LOOPBACK, first.port)}

            async def stream() -> None:
                rng = random.Random(7)
                for i in range(READINGS):
                    for meter in meters:
                        ts = t0 + i * 60_000
                        reading = meter.submit(profile_for(meter.meter_id).measure(ts, rng))
                        generated.add((meter.meter_id, reading.seq))
                    await asyncio.sleep(INTERVAL_S)

            streaming = asyncio.create_task(stream())
            await async_wait_until(lambda: worker.committed >= 5 * METERS, what="stored")
            await async_wait_until(lambda: on_second.count > 0, what="verified on the second")
            first.kill9()
            killed_at = time.time()
            await streaming
            async with asyncio.timeout(90):
                await asyncio.gather(*(m.drain() for m in meters))
            for meter in meters:
                await meter.stop()
        return meters, killed_at

    try:
        meters, killed_at = asyncio.run(scenario())
    finally:
        on_second.close()

    assert {m.on_broker for m in meters} == {(LOOPBACK, second.port)}, "a meter stayed behind"
    counts = stored_counts(database_url, ids)
    assert set(counts) == generated, f"lost {sorted(generated - set(counts))[:3]}"
    assert set(counts.values()) == {1}, "a reading stored twice"
    assert len(generated) == METERS * READINGS
    # Every reading has exactly one first receipt; a copy republished after the kill is
    # refused as a duplicate, never stored again.
    assert sum(m.stats.accepted + m.stats.duplicate for m in meters) == len(generated)
    assert not any(m.stats.rejected for m in meters)
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM min(stored_at)) FROM readings"
            " WHERE meter_id = ANY(%s) AND stored_at > to_timestamp(%s)",
            (ids, killed_at),
        ).fetchone()
    assert row is not None
    assert row[0] is not None, "nothing stored after the kill"
    accepted = sum(m.stats.accepted for m in meters)
    print(
        f"broker kill -9: first reading stored {float(row[0]) - killed_at:.2f} s later;"
        f" {accepted} accepted, {len(generated) - accepted} receipted as duplicate,"
        f" {sum(m.stats.republished for m in meters)} republished"
    )

    oracle = load_oracle(pki.oracle_key)
    anchor(database_url, oracle, wall_ms())
    verified = CliRunner().invoke(
        ledger, ["verify", "--database-url", database_url, "--oracle-pub", str(pki.oracle_pub)]
    )
    assert verified.exit_code == 0, verified.output
    assert verified.output.startswith("OK"), verified.output


class _Listener:
    """A service identity subscribed to `topic` on one broker, counting what it receives."""

    def __init__(self, pki: PkiLayout, service: str, port: int, topic: str) -> None:
        files = pki.service(service)
        self.count = 0
        subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"listener-{port}", protocol=mqtt.MQTTv5
        )
        self.client.tls_set_context(client_tls(ca_cert=pki.ca_cert, cert=files.cert, key=files.key))
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=0)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = lambda *_: self._received()
        self.client.connect(LOOPBACK, port)
        self.client.loop_start()
        assert subscribed.wait(10), f"no SUBACK for {topic} on {port}"

    def _received(self) -> None:
        self.count += 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_a_meter_whose_first_broker_is_down_starts_on_the_next(
    pki: PkiLayout,
    broker_pair: list[BrokerServer],
    make_meter_id: Callable[[], str],
    tmp_path: Path,
) -> None:
    meter_id = make_meter_id()
    provision(pki, None, meter_id)
    nobody = free_port()  # nothing listens there: the connect is refused
    broker = Broker(LOOPBACK, nobody, pki.ca_cert, ((LOOPBACK, broker_pair[1].port),))

    async def scenario() -> tuple[str, int] | None:
        async with Network() as network:
            meter = MeterClient(
                MeterIdentity.load(pki.device(meter_id)),
                broker=broker,
                state_dir=tmp_path,
                network=network,
                settings=FAST,
            )
            meter.start()
            await async_wait_until(lambda: meter.connected, what="connected")
            where = meter.on_broker
            await meter.stop()
            return where

    assert asyncio.run(scenario()) == (LOOPBACK, broker_pair[1].port)


def test_a_revocation_reaches_a_meter_connected_to_the_second_broker(
    pki: PkiLayout,
    broker_pair: list[BrokerServer],
    broker_pair_env: StackEnv,
    make_meter_id: Callable[[], str],
) -> None:
    meter_id = make_meter_id()
    provision(pki, None, meter_id)
    files = pki.device(meter_id)
    connected, cut = threading.Event(), threading.Event()
    reasons: list[int] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=meter_id, protocol=mqtt.MQTTv5)
    client.tls_set_context(client_tls(ca_cert=pki.ca_cert, cert=files.cert, key=files.key))
    client.on_connect = lambda *_: connected.set()

    def on_disconnect(*args: object) -> None:
        reasons.append(int(getattr(args[3], "value", -1)))
        cut.set()

    client.on_disconnect = on_disconnect
    second = broker_pair[1]
    client.connect(LOOPBACK, second.port)
    client.loop_start()
    try:
        assert connected.wait(10), "no CONNACK from the second broker"
        client.subscribe(topics.receipts(meter_id), qos=1)
        client.reconnect_delay_set(60, 60)  # no reconnect within the test
        env_file = broker_pair_env.run_dir / "stack.env"
        broker_pair_env.write(env_file)
        done = CliRunner().invoke(
            certs, ["--pki-root", str(pki.root), "revoke", meter_id, "--stack-env", str(env_file)]
        )
        assert done.exit_code == 0, done.output
        assert "2 of 2 brokers" in done.output, done.output
        assert cut.wait(5), "the meter on the second broker is still connected"
        assert reasons == [0x98], reasons  # administrative action
    finally:
        client.loop_stop()
        client.disconnect()
    # and neither broker lets it in again
    for broker in broker_pair:
        assert not _admitted(pki, meter_id, broker.port), f"let in again on {broker.name}"


def _admitted(pki: PkiLayout, meter_id: str, port: int) -> bool:
    """A successful CONNACK within 5 s (the CRL fails the handshake, or closes it after)."""
    files = pki.device(meter_id)
    accepted = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=meter_id, protocol=mqtt.MQTTv5)
    client.tls_set_context(client_tls(ca_cert=pki.ca_cert, cert=files.cert, key=files.key))
    client.on_connect = lambda _c, _u, _f, rc, _p: rc.is_failure or accepted.set()
    try:
        client.connect(LOOPBACK, port)
    except OSError:
        return False
    client.loop_start()
    try:
        return accepted.wait(5)
    finally:
        client.loop_stop()
        client.disconnect()


@pytest.fixture(scope="module")
def api_env(ha_cluster: HaCluster) -> dict[str, str]:
    """This module's API process uses the Patroni cluster."""
    return {"METERPROOF_DATABASE_URL": ha_cluster.url}


def test_the_api_keeps_answering_through_a_primary_kill(
    ha_cluster: HaCluster,
    api_server: ApiServer,
    pki: PkiLayout,
    make_meter_id: Callable[[], str],
) -> None:
    """kill -9 of the primary's postmaster while an operator reads a meter five times a
    second: the same API process answers again by itself once Patroni has promoted the
    standby (libpq's multi-host URL), without a restart."""
    ha_cluster.wait_replicated()
    meter_id = make_meter_id()
    provision(pki, ha_cluster.url, meter_id)
    old = ha_cluster.primary()
    assert old is not None
    token = api_server.operator_token()
    answers: list[tuple[float, int | str]] = []
    with api_server.client(headers={"Authorization": f"Bearer {token}"}) as http:

        def ask() -> None:
            try:
                code: int | str = http.get(f"/api/meters/{meter_id}").status_code
            except httpx.TransportError as exc:
                code = type(exc).__name__
            answers.append((time.monotonic(), code))

        ask()
        assert answers[-1][1] == 200, answers
        old.kill_postgres()
        killed = time.monotonic()
        while time.monotonic() - killed < 45:
            ask()
            if answers[-1][1] == 200 and ha_cluster.primary() not in (None, old):
                break
            time.sleep(0.2)
        for _ in range(10):
            ask()
            time.sleep(0.1)
    assert api_server.proc.poll() is None, "the API process died"
    after = [(t, code) for t, code in answers if t > killed]
    refused = [code for _, code in after if code != 200]
    back = next(t for t, code in after if code == 200) - killed
    print(f"API through a primary kill: 200 again {back:.2f} s later, meanwhile {refused}")
    assert all(code == 200 for _, code in after[-10:]), after[-10:]
    assert back < 30
    old.start()
    ha_cluster.wait_replicated(timeout=60)
    wait_until(lambda: ha_cluster.primary() is not None, what="a primary")


def test_a_worker_started_while_a_broker_is_down_subscribes_there_once_it_is_back(
    pki: PkiLayout,
    broker_pair: list[BrokerServer],
    broker_pair_env: StackEnv,
    database_url: str,
    make_meter_id: Callable[[], str],
    tmp_path: Path,
) -> None:
    """The worker starts on the broker that runs; a meter that only knows the other one
    has its readings stored once that broker is back, without a worker restart."""
    first, second = broker_pair
    meter_id = make_meter_id()
    provision(pki, database_url, meter_id)
    settings = worker_settings(
        pki=pki,
        port=first.port,
        database_url=database_url,
        redis_url=None,
        mqtt_brokers=broker_pair_env.mqtt_brokers,
    )
    end_session(pki, pki.service(settings.identity), second.port)
    second.kill9()
    only_second = Broker(LOOPBACK, second.port, pki.ca_cert)

    async def scenario() -> int:
        async with running_worker(settings), Network() as network:
            meter = MeterClient(
                MeterIdentity.load(pki.device(meter_id)),
                broker=only_second,
                state_dir=tmp_path,
                network=network,
                settings=FAST,
            )
            meter.start()
            meter.submit(profile_for(meter_id).measure(wall_ms() - 60_000, random.Random(1)))
            await asyncio.to_thread(second.start)
            async with asyncio.timeout(60):
                await meter.drain()
            await meter.stop()
            return meter.stats.accepted

    assert asyncio.run(scenario()) == 1
    assert stored_counts(database_url, [meter_id]) == {(meter_id, 1): 1}
