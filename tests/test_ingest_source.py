"""The MQTT source against a real Mosquitto: every gmqtt internal `ingest._gmqtt` uses is
exercised here (taking PUBLISH/PUBACK over, reading each connection directly, raw writes,
packet ids, the outbound window), so a gmqtt that changes them fails this file loudly."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from fixtures.servers import refusing_ingest_clients
from gmqtt import Client
from ingest_harness import ProbeMeter, end_session, provision, worker_settings
from structlog.testing import capture_logs
from waiting import async_wait_until

from meterproof.certs.layout import PkiLayout
from meterproof.ingest import _gmqtt
from meterproof.ingest._gmqtt import OutboundWindow
from meterproof.ingest._wire import Drop
from meterproof.ingest.source import (
    BROKERS_SILENT,
    BrokerRefusedError,
    BrokerSet,
    Delivery,
    MqttSource,
    mqtt_source,
)
from meterproof.ingest.telemetry import BROKER_REFUSALS, PACKETS_DROPPED
from meterproof.ingest.worker import Worker, postgres_store
from meterproof.mosquitto.admin import dynsec_commands
from meterproof.mosquitto.config import BrokerFiles
from meterproof.schemas import topics
from meterproof.stack.broker import BrokerServer
from meterproof.stack.process import LOOPBACK


def test_window_blocks_at_its_limit_and_reopens_on_puback() -> None:
    async def scenario() -> tuple[bool, ...]:
        window = OutboundWindow(limit=2)
        window.push_message(1, b"a")
        await asyncio.wait_for(window.wait_for_room(), 0.1)
        window.push_message(2, b"b")
        waiter = asyncio.ensure_future(window.wait_for_room())
        await asyncio.sleep(0)
        blocked = not waiter.done()
        window.remove_message_by_mid(1)
        await asyncio.wait_for(waiter, 0.1)
        window.push_message(3, b"c")
        window.fit(receive_maximum=4)  # a broker that allows fewer, less gmqtt's reserve
        narrowed = window.full and window.limit == 1
        window.remove_message_by_mid(2)
        still_full = window.full
        window.remove_message_by_mid(3)
        await asyncio.wait_for(window.wait_for_room(), 0.1)
        return blocked, waiter.done(), narrowed, still_full, window.is_empty

    assert asyncio.run(scenario()) == (True, True, True, True, True)


@pytest.mark.slow
def test_receive_ack_reconnect_redeliver_and_publish_through_the_real_broker(
    pki: PkiLayout, broker: BrokerServer, meter_id: str
) -> None:
    provision(pki, None, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url="postgresql://unused", redis_url=None,
        publish_window=3,
    )  # fmt: skip
    crashes_before = len(getattr(broker, "crashes", []))

    async def scenario() -> dict[str, Any]:
        got: list[Delivery] = []
        source = mqtt_source(settings)
        await source.start(got.append)
        await async_wait_until(lambda: source.connected, what="subscribed (SUBACK)")
        meter = ProbeMeter(meter_id, None, pki, broker.port)
        await meter.connect()
        for n in (1, 2):
            meter.publish(b'{"n":%d}' % n)
        await async_wait_until(lambda: len(got) == 2, what="two deliveries")
        first, second = got
        acked = source.ack([first])

        # A byte the broker never sends: dropped, counted, and the link stays up.
        before = PACKETS_DROPPED.labels(reason=Drop.TOPIC.value)._value.get()
        connection = source._client._connection
        connection._protocol.data_received(b"\x32\x06\x00\x01+\x00\x09\x00")
        await async_wait_until(
            lambda: PACKETS_DROPPED.labels(reason=Drop.TOPIC.value)._value.get() > before,
            what="the dropped PUBLISH counted",
        )
        link_survived = source.connected and source._client._connection is connection

        # A packet type the broker must refuse: it closes the link, gmqtt reconnects, and
        # the unacknowledged delivery comes again on the new link. Two publishes sent
        # behind the bad packet are never acknowledged on the old link: the new one
        # replays them, once each. So is one published in the very call that handles the
        # resumed session's CONNACK, as a worker's batch finishing then would be.
        assert _gmqtt.write_raw(source._client, b"\x00\x00")
        await source.publish_many([(topics.receipts(meter_id), b'{"r":%d}' % n) for n in (-3, -2)])
        source._client.on_connect = _publishing_at_connack(
            source, (topics.receipts(meter_id), b'{"r":-1}')
        )
        await async_wait_until(lambda: len(got) == 3, what="the redelivery")
        again = got[2]
        stale_ack = source.ack([second])  # its link is gone: the id is ambiguous now
        fresh_ack = source.ack([again])

        # Outbound: more publishes than the window holds; each waits for PUBACKs.
        await source.publish_many([(topics.receipts(meter_id), b'{"r":%d}' % n) for n in range(5)])
        receipts = await meter.wait_receipts(8)
        await source.stop()

        # The acknowledged deliveries are gone from the session: a new source with the same
        # identity gets the next message first, nothing older.
        fresh: list[Delivery] = []
        resumed = mqtt_source(settings)
        await resumed.start(fresh.append)
        await async_wait_until(lambda: resumed.connected, what="resubscribed")
        meter.publish(b'{"n":3}')
        await async_wait_until(lambda: fresh, what="the next delivery")
        resumed.ack(fresh)
        await resumed.stop()
        await meter.close()
        return {
            "payloads": [d.message.payload for d in got],
            "links": [d.link for d in got],
            "mids": (second.mid, again.mid),
            "acks": (acked, stale_ack, fresh_ack),
            "link_survived": link_survived,
            "receipts": receipts,
            "resumed": [d.message.payload for d in fresh],
        }

    out = asyncio.run(scenario())
    assert out["payloads"] == [b'{"n":1}', b'{"n":2}', b'{"n":2}']
    assert out["links"] == [1, 1, 2]
    assert out["mids"][0] == out["mids"][1]  # the broker resends under the same id
    assert out["acks"] == (1, 0, 1)
    assert out["link_survived"]
    if len(getattr(broker, "crashes", [])) == crashes_before:
        assert out["receipts"] == [{"r": n} for n in range(-3, 5)]
    else:  # Mosquitto died on its own and was restarted: QoS 1 may deliver a receipt twice
        assert {r["r"] for r in out["receipts"]} == set(range(-3, 5))
    assert out["resumed"] == [b'{"n":3}']


def _publishing_at_connack(source: Any, item: tuple[str, bytes]) -> Any:
    """The source's CONNACK callback, then one publish inside the same call: with room in
    the window `publish_many` completes without awaiting, so one `send` runs all of it."""

    def on_connect(client: Any, flags: int, rc: int, properties: Any) -> None:
        source._on_connect(client, flags, rc, properties)
        publishing = source.publish_many([item])
        with pytest.raises(StopIteration):
            publishing.send(None)

    return on_connect


def test_a_read_stops_the_socket_only_when_the_link_is_busy() -> None:
    """A read after a quiet spell leaves the socket read; a read within the pause of the
    read before it, or of the end of a pause, stops it for the pause."""

    async def scenario() -> list[bool]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        pause = _gmqtt.ReadPause(transport, 0.05)
        reading: list[bool] = []
        try:
            pause.start()  # the first read, after a quiet spell
            reading.append(transport.is_reading())
            pause.start()  # a read at once
            reading.append(transport.is_reading())
            await asyncio.sleep(0.07)
            reading.append(transport.is_reading())  # the pause has ended
            pause.start()  # a read at its end
            reading.append(transport.is_reading())
            await asyncio.sleep(0.2)
            reading.append(transport.is_reading())
            pause.start()  # a read after a quiet spell
            reading.append(transport.is_reading())
        finally:
            transport.close()
            theirs.close()
        return reading

    assert asyncio.run(scenario()) == [True, False, True, False, True, True]


@pytest.mark.parametrize("pause_ms", [0, 100])
def test_a_read_pause_takes_a_trickle_several_readings_per_read(
    pki: PkiLayout, broker: BrokerServer, meter_id: str, pause_ms: int
) -> None:
    """Readings 10 ms apart: without the pause each is its own read (its own wake-up);
    with 100 ms, one read takes those that arrived meanwhile. None is lost or reordered."""
    provision(pki, None, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url="postgresql://unused", redis_url=None,
        read_pause_ms=pause_ms,
    )  # fmt: skip

    async def scenario() -> list[tuple[float, bytes]]:
        loop = asyncio.get_running_loop()
        got: list[tuple[float, bytes]] = []
        source = mqtt_source(settings)
        await source.start(lambda d: got.append((loop.time(), d.message.payload)))
        await async_wait_until(lambda: source.connected, what="subscribed (SUBACK)")
        meter = ProbeMeter(meter_id, None, pki, broker.port)
        await meter.connect()
        for n in range(20):
            meter.publish(b'{"n":%d}' % n)
            await asyncio.sleep(0.01)
        await async_wait_until(lambda: len(got) == 20, what="twenty deliveries")
        await source.stop()
        await meter.close()
        return got

    got = asyncio.run(scenario())
    assert [payload for _, payload in got] == [b'{"n":%d}' % n for n in range(20)]
    reads = 1 + sum(1 for (a, _), (b, _) in itertools.pairwise(got) if b - a > 0.003)
    if pause_ms:
        assert reads <= 6  # ~200 ms of arrivals in reads at least 100 ms apart
    else:
        assert reads >= 12


@pytest.mark.slow
def test_a_window_wider_than_the_broker_allows_waits_instead_of_running_out_of_ids(
    pki: PkiLayout, broker: BrokerServer, meter_id: str
) -> None:
    """The broker's Receive Maximum (its max_inflight_messages, 10,000 here) bounds the
    publishes in flight whatever `publish_window` says: past it gmqtt has no packet id
    left to give, and Mosquitto would disconnect a client that exceeded it."""
    provision(pki, None, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url="postgresql://unused", redis_url=None,
        publish_window=20_000,
    )  # fmt: skip
    count = 10_050

    async def scenario() -> tuple[int, int]:
        source = mqtt_source(settings)
        await source.start(lambda _: None)
        await async_wait_until(lambda: source.connected, what="subscribed (SUBACK)")
        try:
            await asyncio.wait_for(
                source.publish_many([(f"verified/{meter_id}/readings", b"{}")] * count), 30
            )
            limit = source._window.limit
            await async_wait_until(lambda: source._window.is_empty, what="every PUBACK")
        finally:
            await source.stop()
        return limit, count

    limit, _ = asyncio.run(scenario())
    assert limit < 10_000


@pytest.mark.slow
def test_a_broker_gone_silent_with_the_window_full_has_its_link_cut_and_gets_everything_after(
    pki: PkiLayout, broker: BrokerServer, meter_id: str
) -> None:
    """The broker stops answering and closes nothing (SIGSTOP: its machine paused). With
    the window full the worker waited for a PUBACK for good: gmqtt's own close after two
    keepalives waits on the bytes the broker does not read. After `broker_silent_s` the
    link is cut; with this one broker the rest waits, and once the broker is back every
    receipt reaches the meter."""
    provision(pki, None, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url="postgresql://unused", redis_url=None,
        publish_window=3, broker_silent_s=2,
    )  # fmt: skip
    cuts = BROKERS_SILENT._value.get()

    async def scenario() -> tuple[set[bytes], float]:
        source = mqtt_source(settings)
        await source.start(lambda _: None)
        await async_wait_until(lambda: source.connected, what="subscribed (SUBACK)")
        meter = ProbeMeter(meter_id, None, pki, broker.port)
        await meter.connect()
        broker.pause()
        try:
            publishing = asyncio.ensure_future(
                source.publish_many(
                    [(topics.receipts(meter_id), b'{"r":%d}' % n) for n in range(10)]
                )
            )
            await async_wait_until(
                lambda: BROKERS_SILENT._value.get() > cuts, what="cut", within_s=15
            )
            assert not publishing.done()  # the one broker: the rest waits for it
        finally:
            broker.resume()
        resumed = time.monotonic()
        try:
            await asyncio.wait_for(publishing, 30)
            published_s = time.monotonic() - resumed
            receipts = await meter.wait_receipts(10, within_s=30)
            await async_wait_until(lambda: source._window.is_empty, what="every PUBACK")
        finally:
            await source.stop()
            await meter.close()
        return {orjson.dumps(r) for r in receipts}, published_s

    receipts, published_s = asyncio.run(scenario())
    assert receipts == {b'{"r":%d}' % n for n in range(10)}
    assert BROKERS_SILENT._value.get() - cuts == 1
    assert published_s < 30


@pytest.mark.slow
def test_publishes_in_flight_when_the_broker_lost_the_session_are_sent_again(
    pki: PkiLayout, broker: BrokerServer, meter_id: str
) -> None:
    """Receipts written but not acknowledged when the link broke go out again after the
    reconnect even when the broker no longer has the session (Session Present 0: it
    expired, or went in a crash). Discarding them, as gmqtt does, lost them, and kept
    their packet ids in use for ever."""
    provision(pki, None, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url="postgresql://unused", redis_url=None,
        publish_window=3,
    )  # fmt: skip

    async def scenario() -> tuple[list[dict[str, Any]], int]:
        source = mqtt_source(settings)
        await source.start(lambda _: None)
        await async_wait_until(lambda: source.connected, what="subscribed (SUBACK)")
        meter = ProbeMeter(meter_id, None, pki, broker.port)
        await meter.connect()
        source._client.set_config({"reconnect_delay": 3})  # time to end the session
        assert _gmqtt.write_raw(source._client, b"\x00\x00")  # the broker ends the link
        await source.publish_many([(topics.receipts(meter_id), b'{"r":%d}' % n) for n in (1, 2)])
        await asyncio.to_thread(end_session, pki, pki.service(settings.identity), broker.port)
        try:
            receipts = await meter.wait_receipts(2, within_s=15)
            await async_wait_until(lambda: source._window.is_empty, what="every PUBACK")
            in_use = len(source._client._package_handler.id_generator._used_ids)
        finally:
            await source.stop()
            await meter.close()
        return receipts, in_use

    receipts, in_use = asyncio.run(scenario())
    assert receipts == [{"r": 1}, {"r": 2}]
    assert in_use == 0


@pytest.mark.slow
def test_nothing_is_acknowledged_on_a_new_link_before_its_connack(
    pki: PkiLayout, broker: BrokerServer, meter_id: str
) -> None:
    """Between a reconnect's CONNECT and its CONNACK, gmqtt's connection is already the new
    one while the deliveries in hand are the old link's: a PUBACK written then would reach
    a session whose ids need not be the old link's. The delivery is acknowledged through
    its redelivery instead."""
    provision(pki, None, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url="postgresql://unused", redis_url=None
    )

    async def scenario() -> tuple[list[int], list[Delivery]]:
        got: list[Delivery] = []
        early: list[int] = []
        source = mqtt_source(settings)
        await source.start(got.append)
        await async_wait_until(lambda: source.connected, what="subscribed (SUBACK)")
        meter = ProbeMeter(meter_id, None, pki, broker.port)
        await meter.connect()
        meter.publish(b'{"n":1}')
        await async_wait_until(lambda: got, what="the delivery")
        client = source._client
        create = client._create_connection

        async def creating(*args: Any, **kwargs: Any) -> Any:
            connection = await create(*args, **kwargs)
            # runs once the reconnect has written its CONNECT, before the CONNACK is read
            asyncio.get_running_loop().call_soon(lambda: early.append(source.ack(got[:1])))
            return connection

        client._create_connection = creating
        try:
            assert _gmqtt.write_raw(client, b"\x00\x00")  # the broker ends the link
            await async_wait_until(lambda: len(got) == 2, what="the redelivery", within_s=10)
            source.ack(got[1:])
        finally:
            await source.stop()
            await meter.close()
        return early, got

    early, got = asyncio.run(scenario())
    assert early == [0]
    assert [(d.message.payload, d.link) for d in got] == [(b'{"n":1}', 1), (b'{"n":1}', 2)]


@pytest.mark.parametrize(
    ("code", "permanent"),
    [
        (0x87, True),  # not authorized
        (0x86, True),  # bad user name or password
        (0x8A, True),  # banned
        (0x85, True),  # client identifier not valid
        (0x84, True),  # unsupported protocol version
        (5, True),  # MQTT 3.1.1: not authorised
        (0x88, False),  # server unavailable
        (0x89, False),  # server busy
        (0x97, False),  # quota exceeded
        (0x9C, False),  # use another server
        (0x9F, False),  # connection rate exceeded
        (3, False),  # MQTT 3.1.1: server unavailable
        (10, False),  # gmqtt: a CONNACK it could not parse
    ],
)
def test_refusals_no_retry_can_change_are_told_from_those_that_may_pass(
    code: int, permanent: bool
) -> None:
    refused = BrokerRefusedError("127.0.0.1:8883", code)
    assert (refused.code, refused.permanent) == (code, permanent)
    assert refused.exit_code == (1 if permanent else 75)
    assert f"{code:#04x}" in str(refused)


def test_a_refused_first_connection_is_left_to_the_caller_to_retry() -> None:
    """Before the first accepted connection, gmqtt must not reconnect by itself after a
    refusal that may pass (server busy): the worker retries with its backoff, and a
    connection of gmqtt's own a second later would race it under the same client id.
    Afterwards gmqtt's judgement applies again, and each refusal is told to the caller.
    (Mosquitto 2.0.11 refuses only with codes no retry changes, so no real broker here
    sends a "server busy".)"""
    client = Client("ingest-0")
    accepted = False
    told: list[tuple[int, bool]] = []
    _gmqtt.refusals_left_to_the_caller(
        client, until=lambda: accepted, afterwards=lambda code, again: told.append((code, again))
    )
    judged = client._package_handler._is_retryable_connack
    assert not judged(0x89)
    accepted = True
    assert judged(0x89)
    assert not judged(0x87)
    assert told == [(0x89, True), (0x87, False)]


def _without_topic_acl(files: BrokerFiles) -> None:
    """No `acl_file`: the dynamic-security plugin alone judges, and it denies by default
    (`mosquitto.config.dynsec_config`), SUBSCRIBE included (acl_file grants every
    subscription, so a broker with it never refuses one)."""
    conf = files.conf.read_text().splitlines(keepends=True)
    files.conf.write_text("".join(line for line in conf if not line.startswith("acl_file ")))


def _refusals(packet: str, code: int) -> float:
    value: float = BROKER_REFUSALS.labels(packet=packet, reason_code=f"{code:#04x}")._value.get()
    return value


@pytest.mark.slow
def test_a_broker_of_several_that_refuses_for_good_is_told_once_counted_and_retried(
    pki: PkiLayout,
    broker: BrokerServer,
    misconfigured_broker: Callable[[Callable[[BrokerFiles], None]], BrokerServer],
) -> None:
    """One broker of two refuses the worker (not authorized): the worker runs on the other
    and keeps trying it with backoff (an operator may fix its ACL), each refused attempt
    counted by reason code, and one warning naming the code, not one per attempt. It was
    a debug line at each attempt, and counted nowhere."""
    refusing = misconfigured_broker(refusing_ingest_clients)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url="postgresql://unused", redis_url=None,
        mqtt_brokers=f"{LOOPBACK}:{broker.port},{LOOPBACK}:{refusing.port}",
    )  # fmt: skip
    before = _refusals("connack", 0x87)

    async def scenario() -> bool:
        source = mqtt_source(settings)
        assert isinstance(source, BrokerSet)
        await source.start(lambda delivery: None)
        await async_wait_until(
            lambda: _refusals("connack", 0x87) - before >= 3,
            what="the first attempt and two retries refused",
        )
        connected = source.connected
        await source.stop()
        return connected

    with capture_logs() as logs:
        assert asyncio.run(scenario())
    told = [e for e in logs if e["event"] == "broker_refused_retrying"]
    assert [(e["log_level"], e["broker"], e["reason_code"]) for e in told] == [("warning", 1, 0x87)]
    assert "broker_unreachable_at_start" not in [e["event"] for e in logs]


def _allowing_subscriptions(broker: BrokerServer, identity: str) -> None:
    """An operator fixing the running broker's ACL: the dynamic-security plugin made to
    know `identity` (it defers on a client it does not know, and with no acl_file to
    defer to that is a refusal), and its default for SUBSCRIBE turned to allow."""
    allow = [{"acltype": "subscribe", "allow": True}]
    commands: list[dict[str, Any]] = [
        {"command": "createClient", "username": identity},
        {"command": "setDefaultACLAccess", "acls": allow},
    ]
    answers = dynsec_commands(broker.files, broker.admin_port, commands)
    assert all("error" not in answer for answer in answers), answers


@pytest.mark.slow
def test_a_refused_subscription_is_counted_logged_and_retried_on_the_same_link(
    pki: PkiLayout,
    misconfigured_broker: Callable[[Callable[[BrokerFiles], None]], BrokerServer],
) -> None:
    """A broker that takes the connection but refuses the readings' subscription (here
    one whose topic ACL is missing): every refusal is counted by reason code and logged
    with it, the source does not call itself connected (`/readyz` says so), and the
    SUBSCRIBE is sent again with backoff on the same link, so the worker takes its share
    as soon as the ACL is fixed. It was sent again only on a new link, which a broker that
    keeps the connection never brings: the worker sat idle until `broker_lost_exit_s`.
    No line names the share group, a secret (each named it in its topic)."""
    refusing = misconfigured_broker(_without_topic_acl)
    settings = worker_settings(
        pki=pki, port=refusing.port, database_url="postgresql://unused", redis_url=None
    )
    before = _refusals("suback", 0x87)

    async def scenario() -> tuple[bool, bool, int, int]:
        source = mqtt_source(settings)
        assert isinstance(source, MqttSource)
        await source.start(lambda delivery: None)
        try:
            await async_wait_until(
                lambda: _refusals("suback", 0x87) - before >= 2,
                what="the SUBSCRIBE refused, sent again, refused again",
            )
            idle = source.connected
            await asyncio.to_thread(_allowing_subscriptions, refusing, settings.identity)
            await async_wait_until(lambda: source.connected, what="subscribed once allowed")
            return idle, source.connected, source._link, len(source._client.subscriptions)
        finally:
            await source.stop()

    with capture_logs() as logs:
        idle, subscribed, link, kept = asyncio.run(scenario())
    assert (idle, subscribed, link, kept) == (False, True, 1, 1)
    refused = [e for e in logs if e["event"] == "broker_refused_subscription"]
    assert len(refused) == _refusals("suback", 0x87) - before
    assert {(e["log_level"], e["reason_code"]) for e in refused} == {("error", 0x87)}
    assert all(e["retry_in_s"] > 0 for e in refused)
    assert {"broker_connected", "broker_subscribed"} <= {e["event"] for e in logs}
    assert not [e for e in logs if settings.share_group in str(e)]


def _accepting(files: BrokerFiles) -> None:
    """The project's broker as rendered: a reconnect test edits it between two runs."""


@pytest.mark.slow
def test_a_refused_reconnect_is_counted_and_logged_with_its_reason_code(
    pki: PkiLayout,
    misconfigured_broker: Callable[[Callable[[BrokerFiles], None]], BrokerServer],
) -> None:
    """After the first connection gmqtt reconnects by itself, and raises nothing when the
    broker refuses it: the refusal is counted and logged by reason code all the same (it
    was counted only for the first connection)."""
    server = misconfigured_broker(_accepting)
    settings = worker_settings(
        pki=pki, port=server.port, database_url="postgresql://unused", redis_url=None
    )
    before = _refusals("connack", 0x87)

    async def scenario() -> None:
        source = mqtt_source(settings)
        await source.start(lambda delivery: None)
        try:
            await async_wait_until(lambda: source.connected, what="subscribed (SUBACK)")
            await asyncio.to_thread(server.stop)
            refusing_ingest_clients(server.files)
            await asyncio.to_thread(server.start)
            await async_wait_until(
                lambda: _refusals("connack", 0x87) > before, what="the reconnect refused"
            )
        finally:
            await source.stop()

    with capture_logs() as logs:
        asyncio.run(scenario())
    assert _refusals("connack", 0x87) == before + 1  # gmqtt does not retry "not authorized"
    (refused,) = [e for e in logs if e["event"] == "broker_refused_reconnect"]
    assert (refused["log_level"], refused["reason_code"], refused["retrying"]) == (
        "error", 0x87, False
    )  # fmt: skip


@pytest.mark.slow
def test_a_worker_whose_subscription_stays_refused_exits_saying_so(
    pki: PkiLayout,
    misconfigured_broker: Callable[[Callable[[BrokerFiles], None]], BrokerServer],
    database_url: str,
) -> None:
    """Connected the whole time, its subscription refused: after `broker_lost_exit_s` the
    worker exits 75 naming the refusal's reason code, not "unreachable" (what an operator
    reading that line would look for is the broker's ACL, not the network)."""
    refusing = misconfigured_broker(_without_topic_acl)
    settings = worker_settings(
        pki=pki, port=refusing.port, database_url=database_url, redis_url=None,
        broker_lost_exit_s=2,
    )  # fmt: skip

    async def scenario() -> int:
        worker = Worker(
            settings, source=mqtt_source(settings), store_factory=postgres_store(settings)
        )
        await asyncio.wait_for(worker.run(), 30)
        return worker.exit_code

    with capture_logs() as logs:
        code = asyncio.run(scenario())
    assert code == 75
    events = [e["event"] for e in logs]
    assert "broker_unreachable_exiting" not in events
    (exiting,) = [e for e in logs if e["event"] == "broker_refused_subscription_exiting"]
    assert (exiting["reason_code"], exiting["after_s"]) == (0x87, 2)
