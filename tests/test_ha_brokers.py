"""Redundant brokers (`stack up --ha`) with real Mosquitto pairs (tests/fixtures/ha.py):
a broker killed with -9 under a fleet of reference meters (the client the simulator and
the P1 reader use) sends them to the other broker while the worker, subscribed on both,
keeps storing; every reading generated is stored exactly once, receipted, and the ledger
over them verifies. A revocation reaches a meter connected to the second broker. And the
API process keeps answering through a kill -9 of the PostgreSQL primary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import psycopg
import pytest
from click.testing import CliRunner
from fixtures.api import ApiServer, signed
from ingest_harness import end_session, provision, running_worker, stored_counts, worker_settings
from paho.mqtt.enums import CallbackAPIVersion
from structlog.testing import capture_logs
from test_retention import anchor
from waiting import async_wait_until, wait_until
from websocket_harness import websocket
from websockets.exceptions import ConnectionClosed

from meterproof.api.republish import Republisher
from meterproof.bridge.cli import ledger
from meterproof.bridge.oracle import load_oracle
from meterproof.bridge.publish import EveryBroker
from meterproof.certs.cli import certs
from meterproof.certs.identities import issue_integrator
from meterproof.certs.layout import IdentityFiles, PkiLayout
from meterproof.certs.tls import client_context
from meterproof.config import StackEnv, format_brokers
from meterproof.demo.consent import integrator_client
from meterproof.meter.client import Broker, ClientSettings, MeterClient
from meterproof.meter.identity import MeterIdentity, client_tls
from meterproof.meter.network import Network
from meterproof.meter.profile import profile_for
from meterproof.mosquitto.admin import reload_identities
from meterproof.schemas import topics
from meterproof.schemas.timestamps import wall_ms
from meterproof.stack.broker import BrokerServer
from meterproof.stack.ha import HaCluster
from meterproof.stack.process import LOOPBACK, free_port
from meterproof.stack.redis import RedisServer

pytestmark = pytest.mark.slow
#: mosquitto.conf.tmpl's autosave_interval: what a kill -9 keeps of the broker's sessions.
AUTOSAVE_S = 10

METERS = 20
#: The worker's publish window when a broker is paused: fewer than the verified copies
#: sent to it while it is silent, so they fill it.
PAUSE_WINDOW = 50
READINGS = 25
INTERVAL_S = 0.2
#: Meters reconnect fast and republish an unreceipted reading after 3 s, so the readings
#: the killed broker took (and the receipts it held) come round again within the test.
FAST = ClientSettings(
    reconnect_min_s=0.2, reconnect_max_s=1.0, republish_after_s=3.0, durable=False
)


def _meter(
    pki: PkiLayout,
    env: StackEnv,
    network: Network,
    meter_id: str,
    state_dir: Path,
    settings: ClientSettings = FAST,
) -> MeterClient:
    return MeterClient(
        MeterIdentity.load(pki.device(meter_id)),
        broker=Broker.from_env(env),
        state_dir=state_dir / meter_id,
        network=network,
        settings=settings,
    )


@pytest.mark.parametrize("fault", ["kill9", "pause"])
def test_a_broker_lost_under_a_fleet_moves_the_meters_and_loses_nothing(
    fault: str,
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
    # A paused broker closes nothing: a meter finds it silent by its keepalive (a ping
    # unanswered for another keepalive), so a short one keeps the test short.
    meter_settings = FAST if fault == "kill9" else dataclasses.replace(FAST, keepalive_s=5)
    ids = [make_meter_id() for _ in range(METERS)]
    for meter_id in ids:
        provision(pki, database_url, meter_id)
    settings = worker_settings(
        pki=pki,
        port=first.port,
        database_url=database_url,
        redis_url=redis_server.url,
        mqtt_brokers=env.mqtt_brokers,
        publish_window=PAUSE_WINDOW if fault == "pause" else 1000,
        broker_silent_s=5,
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
            meters = [_meter(pki, env, network, m, tmp_path, meter_settings) for m in ids]
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
            if fault == "pause":
                first.pause()
            else:
                first.kill9()
            killed_at = time.time()
            await streaming
            async with asyncio.timeout(90):
                await asyncio.gather(*(m.drain() for m in meters))
            for meter in meters:
                await meter.stop()
        return meters, killed_at

    try:
        with capture_logs() as logs:
            meters, killed_at = asyncio.run(scenario())
    finally:
        on_second.close()
        if fault == "pause":
            first.resume()

    assert {m.on_broker for m in meters} == {(LOOPBACK, second.port)}, "a meter stayed behind"
    # Each meter moved once, straight to the broker that answers: a paused broker's link
    # lost by keepalive once took a meter back to it, to wait out a TLS handshake there.
    moves = Counter(e["client_id"] for e in logs if e["event"] == "mqtt.broker_next")
    assert moves == dict.fromkeys(ids, 1), moves
    assert not [e for e in logs if e["event"] == "mqtt.connect_failed"]
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
        f"broker {fault}: first reading stored {float(row[0]) - killed_at:.2f} s later;"
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
def api_env(ha_cluster: HaCluster, broker_pair: list[BrokerServer]) -> dict[str, str]:
    """This module's API process uses the Patroni cluster and the broker pair."""
    return {
        "METERPROOF_DATABASE_URL": ha_cluster.url,
        "METERPROOF_DATABASE_READ_URL": ha_cluster.read_url,
        "METERPROOF_MQTT_BROKERS": format_brokers(tuple((LOOPBACK, b.port) for b in broker_pair)),
    }


def test_the_api_republishes_http_readings_on_every_broker(
    ha_cluster: HaCluster,
    api_server: ApiServer,
    pki: PkiLayout,
    broker_pair_env: StackEnv,
    broker_pair: list[BrokerServer],
    make_meter_id: Callable[[], str],
) -> None:
    """`meterproof api` as a user starts it, with no identity setting: a reading submitted
    over HTTPS is stored and its verified copy reaches a subscriber on each broker."""
    meter_id = make_meter_id()
    key = provision(pki, ha_cluster.url, meter_id)
    listeners = [_Listener(pki, "bridge", b.port, topics.verified(meter_id)) for b in broker_pair]
    try:
        with api_server.meter_client(meter_id) as http:
            answer = http.post(f"/api/meters/{meter_id}/energy",
                               content=signed(meter_id, key, 1, wall_ms()))  # fmt: skip
        assert answer.status_code == 200, answer.text
        wait_until(lambda: all(listener.count >= 1 for listener in listeners),
                   what="the HTTP reading's verified copy on both brokers")  # fmt: skip
    finally:
        for listener in listeners:
            listener.close()
    assert "republish_connected" in api_server.log.read_text()


def _read_queries(api: ApiServer) -> dict[str, float]:
    """The API's read queries so far, by the server that answered them."""
    return {
        server: api.sample("meterproof_api_read_queries_total", server=server)
        for server in ("standby", "primary")
    }


def _replay_paused(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()
    return row is not None and row[0] == "paused"


def test_history_and_rollups_come_from_the_standby_and_from_the_primary_without_it(
    ha_cluster: HaCluster,
    api_server: ApiServer,
    pki: PkiLayout,
    make_meter_id: Callable[[], str],
) -> None:
    """With `database_read_url` as `stack up --ha` writes it, history and rollups are
    read on the standby: while its replay is paused, a reading stored since is in `latest`
    (the primary) and not in history. With the standby stopped, the same API process
    reads them on the primary, with no error in between."""
    ha_cluster.wait_replicated()
    standby = ha_cluster.standby()
    assert standby is not None
    meter_id = make_meter_id()
    key = provision(pki, ha_cluster.url, meter_id)
    t0 = wall_ms() - 60_000
    token = api_server.operator_token()
    with (
        api_server.meter_client(meter_id) as meter,
        api_server.client(headers={"Authorization": f"Bearer {token}"}) as http,
    ):

        def submit(seq: int) -> None:
            body = signed(meter_id, key, seq, t0 + seq * 1_000, imp=seq)
            answer = meter.post(f"/api/meters/{meter_id}/energy", content=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == "accepted", answer.text

        def history() -> list[int]:
            answer = http.get(f"/api/meters/{meter_id}/history")
            assert answer.status_code == 200, answer.text
            return [reading["seq"] for reading in answer.json()["readings"]]

        def rollups() -> int:
            span = {"from": t0 - 3_600_000, "to": t0 + 3_600_000, "width": "1h"}
            answer = http.get(f"/api/meters/{meter_id}/rollups", params=span)
            assert answer.status_code == 200, answer.text
            return sum(r["readings"] for r in answer.json()["rollups"])

        def on_standby() -> bool:
            """Both reads answered by the standby (a connection made while it was away
            is renewed within a minute, Services.lagging)."""
            before = _read_queries(api_server)
            assert (history(), rollups()) == ([1], 1)
            after = _read_queries(api_server)
            return after["primary"] == before["primary"] and after["standby"] > before["standby"]

        submit(1)
        wait_until(lambda: history() == [1], what="the standby replays the first reading")
        wait_until(on_standby, within_s=90, what="history and rollups read on the standby")

        # Patroni would resume the replay at its next loop; the call only asks for the
        # pause, and replay stops at its next record.
        with ha_cluster.maintenance(), psycopg.connect(standby.url, autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
            try:
                wait_until(lambda: _replay_paused(conn), what="the standby's replay is paused")
                submit(2)
                assert http.get(f"/api/meters/{meter_id}/latest").json()["seq"] == 2
                assert history() == [1]
                assert rollups() == 1
            finally:
                conn.execute("SELECT pg_wal_replay_resume()")
        wait_until(lambda: history() == [1, 2], what="the standby replays the second reading")

        standby.stop()
        try:
            before = _read_queries(api_server)
            assert history() == [1, 2]  # no wait: the first read after the stop answers
            assert rollups() == 2
            after = _read_queries(api_server)
            assert after["primary"] > before["primary"]
            assert after["standby"] == before["standby"]
        finally:
            standby.start()
            ha_cluster.wait_replicated(timeout=60)


def test_the_api_keeps_answering_through_a_primary_kill(
    ha_cluster: HaCluster,
    api_server: ApiServer,
    pki: PkiLayout,
    make_meter_id: Callable[[], str],
) -> None:
    """kill -9 of the primary's postmaster while an operator reads a meter five times a
    second: the same API process answers again by itself once Patroni has promoted the
    standby (libpq's multi-host URL), without a restart. The read pool's connections to
    the old primary, idle through the failover, fail no read after it: each read that
    takes one is tried again on another."""
    ha_cluster.wait_replicated()
    meter_id = make_meter_id()
    provision(pki, ha_cluster.url, meter_id)
    old = ha_cluster.primary()
    assert old is not None
    token = api_server.operator_token()
    auth = {"Authorization": f"Bearer {token}"}
    latest = f"/api/meters/{meter_id}/latest"  # read through the pool; no reading yet: 404
    assert _concurrent_codes(api_server, auth, latest, clients=8) == {404}
    again = api_server.sample("meterproof_api_reads_again_total")
    answers: list[tuple[float, int | str]] = []
    with api_server.client(headers=auth) as http:

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
        pooled = [http.get(latest).status_code for _ in range(10)]
    assert pooled == [404] * 10, pooled
    assert api_server.sample("meterproof_api_reads_again_total") > again
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


def _concurrent_codes(api: ApiServer, headers: dict[str, str], path: str, clients: int) -> set[int]:
    """The status codes of `clients` threads asking `path` five times each at once: the
    API's pool grows to hold several connections."""
    codes: set[int] = set()

    def ask() -> None:
        with api.client(headers=headers) as http:
            codes.update(http.get(path).status_code for _ in range(5))

    threads = [threading.Thread(target=ask) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


def test_a_stream_closes_with_a_reason_when_the_primary_is_lost(
    ha_cluster: HaCluster,
    api_server: ApiServer,
    pki: PkiLayout,
    make_meter_id: Callable[[], str],
) -> None:
    """A stream whose poll finds the database gone (here the primary killed) closes
    4503 `unavailable`, as a request answers 503, and the client reopens it; not with an
    unhandled exception in the API's log and close code 1011 without a reason."""
    ha_cluster.wait_replicated()
    meter_id = make_meter_id()
    provision(pki, ha_cluster.url, meter_id)
    old = ha_cluster.primary()
    assert old is not None
    files = pki.device(meter_id)
    tls = client_context(cert=files.cert, key=files.key, ca_cert=pki.ca_cert)
    uri = api_server.url.replace("https://", "wss://") + f"/api/meters/{meter_id}/stream/status"
    killed = False
    try:
        with websocket(uri, tls=tls) as stream:
            # Connections the API's pool kept from an earlier failover fail no poll.
            assert json.loads(stream.recv(timeout=5))["status"] == "active"
            old.kill_postgres()
            killed = True
            with pytest.raises(ConnectionClosed) as closed:
                stream.recv(timeout=30)
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4503, "unavailable")
        assert "Exception in ASGI application" not in api_server.log.read_text()
    finally:
        if killed:
            wait_until(lambda: ha_cluster.primary() not in (None, old), what="a new primary")
            old.start()
            ha_cluster.wait_replicated(timeout=60)


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


class _Session:
    """A paho subscriber on one broker with a persistent session: what is published while
    it is away (its broker restarted) waits for it on the broker, as for a worker."""

    def __init__(self, pki: PkiLayout, files: IdentityFiles, port: int, topic: str) -> None:
        self.pki, self.files, self.port = pki, files, port
        self.messages: list[mqtt.MQTTMessage] = []
        subscribed = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=files.directory.name, protocol=mqtt.MQTTv5
        )
        client.tls_set_context(client_tls(ca_cert=pki.ca_cert, cert=files.cert, key=files.key))
        client.reconnect_delay_set(1, 1)
        client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = lambda _c, _u, message: self.messages.append(message)
        expiry = mqtt.Properties(mqtt.PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        expiry.SessionExpiryInterval = 3600
        client.connect(LOOPBACK, port, clean_start=False, properties=expiry)
        client.loop_start()
        self.client = client
        assert subscribed.wait(10), f"no SUBACK from the broker on {port}"

    def payloads(self) -> set[bytes]:
        return {bytes(message.payload) for message in list(self.messages)}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        end_session(self.pki, self.files, self.port)


@pytest.mark.parametrize("fault", ["kill9", "pause"])
def test_the_api_republishes_on_every_broker_and_one_down_loses_nothing(
    fault: str, pki: PkiLayout, broker_pair: list[BrokerServer], broker_pair_env: StackEnv
) -> None:
    """The API's republisher as `api` on both brokers: with the second killed (-9) or
    paused (SIGSTOP: its connections stay open, nothing answers), the first gets everything
    at once (no stall), the second's queue holds everything, and once the second is back
    (started, or resumed) it gets everything too (more than one chunk of 500).

    What a broker had acknowledged when it was killed is not covered: Mosquitto saves its
    state every autosave_interval, not per message, so a kill -9 loses messages it had
    acknowledged and not yet delivered, whoever published them."""
    second = broker_pair[1]
    reader = pki.service("bridge")  # the ACL lets the bridge read verified/#
    listeners = [_Session(pki, reader, b.port, topics.VERIFIED_ALL) for b in broker_pair]
    time.sleep(AUTOSAVE_S + 1)  # the subscribers' sessions are saved: they survive a kill -9
    republisher = Republisher(
        pki_root=pki.root, identity="api", brokers=broker_pair_env.brokers(), max_pending=10_000
    )

    def batch(tag: str, n: int) -> list[tuple[str, bytes]]:
        return [(topics.verified(f"m-{tag}"), f"{tag}-{i}".encode()) for i in range(n)]

    before, during = batch("before", 20), batch("during", 1_200)

    async def scenario() -> tuple[float, float]:
        stop = asyncio.Event()
        running = asyncio.create_task(republisher.run(stop))
        try:
            republisher.offer(before)
            want = {body for _, body in before}
            await async_wait_until(
                lambda: all(want <= listener.payloads() for listener in listeners),
                what="the first items on both brokers",
            )
            await asyncio.to_thread(second.pause if fault == "pause" else second.kill9)
            started = time.monotonic()
            republisher.offer(during)
            want = {body for _, body in during}
            await async_wait_until(lambda: want <= listeners[0].payloads(),
                                   what="everything on the broker that runs")  # fmt: skip
            on_first = time.monotonic() - started
            assert len(republisher.queues[1].pending) == len(during)  # held for the other
            await asyncio.to_thread(second.resume if fault == "pause" else second.start)
            back = time.monotonic()
            await async_wait_until(lambda: want <= listeners[1].payloads(), within_s=60,
                                   what="everything on the broker that came back")  # fmt: skip
            await async_wait_until(lambda: not republisher.queues[1].pending,
                                   what="nothing left queued")  # fmt: skip
            return on_first, time.monotonic() - back
        finally:
            stop.set()
            await running

    try:
        on_first, after_restart = asyncio.run(scenario())
    finally:
        for listener in listeners:
            listener.close()
    assert not republisher.queues[0].pending
    print(
        f"API republisher, second broker {fault}: {len(during)} items on the first in"
        f" {on_first:.2f} s; on the second {after_restart:.2f} s after it was back"
    )


def test_the_bridge_summary_is_retained_on_every_broker(
    pki: PkiLayout, broker_pair: list[BrokerServer], broker_pair_env: StackEnv
) -> None:
    """Published while the second broker is down, the summary is retained on the first at
    once and on the second once it is back: a late subscriber on either gets it."""
    first, second = broker_pair
    name = f"integ-{uuid.uuid4().hex[:8]}"
    integrator = issue_integrator(pki, name)
    reload_identities(broker_pair_env, pki)
    second.stop()
    topic = f"ledger/epochs-{uuid.uuid4().hex[:8]}"
    publisher = EveryBroker.of(
        broker_pair_env.brokers(), ca_cert=pki.ca_cert, identity=pki.service("bridge"),
        client_id="bridge", topic=topic,
    )  # fmt: skip
    publisher.start()
    try:
        publisher.publish(b"epoch 1")
        wait_until(lambda: _retained(pki, integrator, first.port, topic) == b"epoch 1",
                   what="the summary retained on the first broker")  # fmt: skip
        second.start()
        assert publisher.close(flush_s=45), "a broker never acknowledged the summary"
    finally:
        publisher.close()
    for broker in broker_pair:
        assert _retained(pki, integrator, broker.port, topic) == b"epoch 1", broker.name


def _retained(pki: PkiLayout, files: IdentityFiles, port: int, topic: str) -> bytes | None:
    """The retained message a subscriber that connects now gets within 5 s, if any."""
    got: list[bytes] = []
    arrived = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=files.directory.name)
    client.tls_set_context(client_tls(ca_cert=pki.ca_cert, cert=files.cert, key=files.key))
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        got.append(bytes(message.payload))
        arrived.set()

    client.on_message = on_message
    client.connect(LOOPBACK, port)
    client.loop_start()
    try:
        arrived.wait(5)
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0] if got else None


def test_the_demo_integrator_reconnects_to_another_broker(
    pki: PkiLayout, broker_pair: list[BrokerServer], broker_pair_env: StackEnv
) -> None:
    """The demo's integrator starts on the second broker while the first is down, and moves
    back to the first when the second is killed; on each it receives its consented feed."""
    first, second = broker_pair
    name = f"integ-{uuid.uuid4().hex[:8]}"
    files = issue_integrator(pki, name)
    reload_identities(broker_pair_env, pki)
    first.kill9()
    received: list[str] = []
    stopping = threading.Event()
    feed = topics.integrator_feed(name)
    client = integrator_client(broker_pair_env, files, [(feed, 1)],
                               on_message=lambda m: received.append(m.payload.decode()),
                               stopping=stopping)  # fmt: skip

    def delivered(broker: BrokerServer, body: str) -> bool:
        """Published as the API would on `broker`; True once the integrator has it."""
        _publish_as_api(pki, broker.port, topics.integrator_verified(name, "m-1"), body)
        time.sleep(0.5)
        return body in received

    try:
        wait_until(lambda: delivered(second, "on the second"), within_s=30,
                   what="the integrator on the second broker")  # fmt: skip
        first.start()
        second.kill9()
        wait_until(lambda: delivered(first, "on the first"), within_s=30,
                   what="the integrator back on the first broker")  # fmt: skip
    finally:
        stopping.set()
        client.disconnect()
        client.loop_stop()
        second.start()


def _publish_as_api(pki: PkiLayout, port: int, topic: str, body: str) -> None:
    files = pki.service("api")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="api", protocol=mqtt.MQTTv5)
    client.tls_set_context(client_tls(ca_cert=pki.ca_cert, cert=files.cert, key=files.key))
    client.connect(LOOPBACK, port)
    client.loop_start()
    try:
        client.publish(topic, body.encode(), qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
