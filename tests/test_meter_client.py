"""The reference meter client against the real broker: every reading arrives at QoS 1
across a broker restart, a meter restart, an outage and a broker kill -9; receipts
settle readings, silence gets them republished, rejections are reported.

`FakeWorker` plays the ingest side: an ingest worker identity of its own on a persistent
shared subscription (clean_start=False from its first connect), answering with receipts as
each test's policy says. Every wait is bounded by WAIT_S.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from ingest_harness import fresh_ingest_identity
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from meterproof.certs import issue_device
from meterproof.certs.layout import PkiLayout
from meterproof.meter.client import Broker, ClientSettings, MeterClient
from meterproof.meter.identity import MeterIdentity, client_tls
from meterproof.meter.network import Network
from meterproof.meter.profile import profile_for
from meterproof.schemas.codec import decode_reading
from meterproof.schemas.reading import Receipt, ReceiptStatus, RejectReason
from meterproof.schemas.signing import reading_hash, signing_bytes
from meterproof.schemas.timestamps import wall_ms
from meterproof.stack.broker import BrokerServer
from meterproof.stack.env import new_share_group

WAIT_S = 20.0
#: Reconnect quickly: the broker is restarted under the meters on purpose.
FAST = ClientSettings(reconnect_min_s=0.2, reconnect_max_s=1.0)


@dataclass(frozen=True, slots=True)
class Delivered:
    meter_id: str
    seq: int
    reading_hash: str
    payload: bytes


#: (delivery, how many times this exact reading has arrived) -> the receipt to send, if any
Policy = Callable[[Delivered, int], Receipt | None]


def accept(delivered: Delivered, nth: int) -> Receipt:
    status = ReceiptStatus.ACCEPTED if nth == 1 else ReceiptStatus.DUPLICATE
    return Receipt(seq=delivered.seq, reading_hash=delivered.reading_hash, status=status)


class FakeWorker:
    """Records every reading the broker delivers; answers with `policy`'s receipts."""

    def __init__(self, pki: PkiLayout, port: int, policy: Policy | None = None) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._deliveries: list[Delivered] = []
        self._subscribed = threading.Event()
        self.client_id = fresh_ingest_identity(pki, port)
        self.topic = f"$share/{new_share_group()}/meters/+/readings"
        self._pki = pki
        self._port = port
        self._client: mqtt.Client | None = None

    def start(self) -> None:
        """Connect (again), with the same client id and so the same session."""
        files = self._pki.service(self.client_id)
        # A fresh paho client per connection: a second loop_start leaks paho's socketpair.
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        client.tls_set_context(
            client_tls(ca_cert=self._pki.ca_cert, cert=files.cert, key=files.key)
        )
        client.reconnect_delay_set(0.1, 0.5)
        client.on_connect = self._connected
        client.on_subscribe = lambda *_: self._subscribed.set()
        client.on_message = self._message
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 300
        self._subscribed.clear()
        client.connect("127.0.0.1", self._port, clean_start=False, properties=properties)
        client.loop_start()
        self._client = client
        assert self._subscribed.wait(WAIT_S), "no SUBACK"

    def pause(self) -> None:
        """Go offline, keeping the session: the broker queues readings for it."""
        self._disconnect(None)

    def stop(self) -> None:
        """Disconnect and let the broker drop the session."""
        properties = Properties(PacketTypes.DISCONNECT)
        properties.SessionExpiryInterval = 0
        self._disconnect(properties)

    def _disconnect(self, properties: Properties | None) -> None:
        if self._client is not None:
            self._client.disconnect(properties=properties)
            self._client.loop_stop()
            self._client = None

    def _connected(
        self, client: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object
    ) -> None:
        if not reason.is_failure:
            client.subscribe(self.topic, qos=1)

    def _message(self, client: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        reading = decode_reading(message.payload)
        digest = reading_hash(signing_bytes(reading)).hex()
        delivered = Delivered(reading.meter_id, reading.seq, digest, message.payload)
        with self._lock:
            self._deliveries.append(delivered)
            nth = sum(d == delivered for d in self._deliveries)
        receipt = self.policy(delivered, nth) if self.policy else None
        if receipt is not None:
            topic = f"meters/{reading.meter_id}/receipts"
            client.publish(topic, receipt.model_dump_json(), qos=1)

    def deliveries(self, meter_id: str) -> list[Delivered]:
        with self._lock:
            return [d for d in self._deliveries if d.meter_id == meter_id]

    def seqs(self, meter_id: str) -> set[int]:
        return {d.seq for d in self.deliveries(meter_id)}


@pytest.fixture
def worker(pki: PkiLayout, broker: BrokerServer) -> Iterator[FakeWorker]:
    fake = FakeWorker(pki, broker.port)
    fake.start()
    yield fake
    fake.stop()


async def wait_until(condition: Callable[[], bool], what: str, within_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.05)


def make_meter(
    pki: PkiLayout,
    broker: BrokerServer,
    network: Network,
    meter_id: str,
    state_dir: Path,
    settings: ClientSettings = FAST,
) -> MeterClient:
    if not pki.device(meter_id).meta.exists():
        issue_device(pki, meter_id)
    return MeterClient(
        MeterIdentity.load(pki.device(meter_id)),
        broker=Broker("127.0.0.1", broker.port, pki.ca_cert),
        state_dir=state_dir,
        network=network,
        settings=settings,
    )


def submit(client: MeterClient) -> int:
    measurement = profile_for(client.meter_id).measure(wall_ms(), random.Random())
    return client.submit(measurement).seq


def assert_no_seq_reused(deliveries: list[Delivered]) -> None:
    """A republish is byte-identical; two payloads under one seq would be a reused nonce."""
    payloads: dict[int, set[bytes]] = {}
    for d in deliveries:
        payloads.setdefault(d.seq, set()).add(d.payload)
    assert all(len(p) == 1 for p in payloads.values())


def test_every_reading_arrives_across_a_broker_restart(
    pki: PkiLayout, broker: BrokerServer, worker: FakeWorker, meter_id: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with Network() as network:
            meter = make_meter(pki, broker, network, meter_id, tmp_path)
            meter.start()
            await wait_until(lambda: meter.connected, "meter connected")
            restart = None
            for n in range(40):
                submit(meter)
                if n == 10:
                    restart = asyncio.create_task(asyncio.to_thread(broker.restart))
                await asyncio.sleep(0.04)
            assert restart is not None
            await restart
            await wait_until(lambda: worker.seqs(meter_id) == set(range(1, 41)), "all 40 seqs")
            assert meter.pending == 40  # nobody sent receipts: all kept for a republish
            await meter.stop()

    asyncio.run(scenario())
    assert_no_seq_reused(worker.deliveries(meter_id))


def test_a_restarted_meter_never_reuses_a_seq_and_uploads_its_backlog(
    pki: PkiLayout, broker: BrokerServer, worker: FakeWorker, meter_id: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with Network() as network:
            first = make_meter(pki, broker, network, meter_id, tmp_path)
            first.start()
            before = [submit(first) for _ in range(5)]
            await wait_until(lambda: worker.seqs(meter_id) == set(before), "first five")
            await first.stop(graceful=False)  # a power cut: no DISCONNECT

            second = make_meter(pki, broker, network, meter_id, tmp_path)
            assert second.pending == 5  # unreceipted, so still in the outbox
            second.start()
            after = [submit(second) for _ in range(5)]
            assert min(after) > max(before)
            await wait_until(lambda: worker.seqs(meter_id) == {*before, *after}, "all ten")
            backlog = Counter(d.seq for d in worker.deliveries(meter_id))
            await wait_until(
                lambda: all(
                    Counter(d.seq for d in worker.deliveries(meter_id))[s] >= 2 for s in before
                ),
                "the backlog republished by the new process",
            )
            assert all(backlog[s] == 1 for s in after)
            await second.stop()

    asyncio.run(scenario())
    assert_no_seq_reused(worker.deliveries(meter_id))


def test_receipts_settle_readings_and_silence_gets_them_republished(
    pki: PkiLayout, broker: BrokerServer, worker: FakeWorker, meter_id: str, tmp_path: Path
) -> None:
    # The first copy of seq 2 goes unanswered, as if the worker had lost it.
    worker.policy = lambda d, nth: None if (d.seq, nth) == (2, 1) else accept(d, 1)

    async def scenario() -> MeterClient:
        async with Network() as network:
            meter = make_meter(
                pki, broker, network, meter_id, tmp_path, replace(FAST, republish_after_s=0.5)
            )
            meter.start()
            for _ in range(4):
                submit(meter)
            async with asyncio.timeout(WAIT_S):
                await meter.drain()
            await meter.stop()
            return meter

    meter = asyncio.run(scenario())
    assert meter.stats.accepted == 4
    assert meter.stats.republished >= 1
    assert Counter(d.seq for d in worker.deliveries(meter_id))[2] >= 2
    assert list((tmp_path / "outbox").iterdir()) == []


def test_a_rejected_receipt_is_reported(
    pki: PkiLayout, broker: BrokerServer, worker: FakeWorker, meter_id: str, tmp_path: Path
) -> None:
    def policy(d: Delivered, nth: int) -> Receipt:
        if d.seq == 1:
            return Receipt(
                seq=1,
                reading_hash=d.reading_hash,
                status=ReceiptStatus.REJECTED,
                reason=RejectReason.BAD_SIGNATURE,
            )
        return accept(d, nth)

    worker.policy = policy
    heard: list[tuple[int, ReceiptStatus]] = []

    async def scenario() -> MeterClient:
        async with Network() as network:
            meter = MeterClient(
                MeterIdentity.load(issue_device(pki, meter_id)),
                broker=Broker("127.0.0.1", broker.port, pki.ca_cert),
                state_dir=tmp_path,
                network=network,
                on_receipt=lambda entry, receipt: heard.append((entry.seq, receipt.status)),
            )
            meter.start()
            submit(meter)
            submit(meter)
            async with asyncio.timeout(WAIT_S):
                await meter.drain()
            await meter.stop()
            return meter

    meter = asyncio.run(scenario())
    assert dict(meter.stats.rejected) == {"bad_signature": 1}
    assert meter.stats.accepted == 1
    assert sorted(heard) == [(1, ReceiptStatus.REJECTED), (2, ReceiptStatus.ACCEPTED)]
    assert meter.pending == 0  # a rejection is final: republishing would not change it


def test_buffers_while_the_broker_is_down_and_uploads_the_backlog(
    pki: PkiLayout, broker: BrokerServer, worker: FakeWorker, meter_id: str, tmp_path: Path
) -> None:
    worker.policy = accept

    async def scenario() -> None:
        async with Network() as network:
            meter = make_meter(
                pki, broker, network, meter_id, tmp_path, replace(FAST, max_inflight=3)
            )
            await asyncio.to_thread(broker.stop)
            meter.start()
            for _ in range(30):
                submit(meter)
            await asyncio.sleep(0.5)
            assert not meter.connected
            assert meter.pending == 30
            await asyncio.to_thread(broker.start)
            async with asyncio.timeout(WAIT_S):
                await meter.drain()
            await meter.stop()

    asyncio.run(scenario())
    assert worker.seqs(meter_id) == set(range(1, 31))


def test_after_a_broker_kill9_receipts_still_bring_every_reading_home(
    pki: PkiLayout, broker: BrokerServer, worker: FakeWorker, meter_id: str, tmp_path: Path
) -> None:
    """The broker acknowledges readings queued for an offline worker, then dies before
    saving them: only the meter's outbox and the missing receipts bring them home."""
    worker.policy = accept

    async def scenario() -> MeterClient:
        async with Network() as network:
            settings = replace(FAST, republish_after_s=1.0)
            meter = make_meter(pki, broker, network, meter_id, tmp_path, settings)
            meter.start()
            await wait_until(lambda: meter.connected, "meter connected")
            await asyncio.to_thread(worker.pause)
            for _ in range(10):
                submit(meter)
            await wait_until(lambda: meter.stats.published == 10, "ten published")
            await asyncio.sleep(0.2)  # their PUBACKs
            await asyncio.to_thread(broker.kill9)
            await asyncio.to_thread(broker.start)
            await asyncio.to_thread(worker.start)
            async with asyncio.timeout(WAIT_S):
                await meter.drain()
            await meter.stop()
            return meter

    meter = asyncio.run(scenario())
    assert worker.seqs(meter_id) == set(range(1, 11))
    assert meter.stats.accepted + meter.stats.duplicate == 10


def test_a_reading_no_worker_subscription_took_is_retried_before_the_receipt_timeout(
    pki: PkiLayout, broker: BrokerServer, meter_id: str, tmp_path: Path
) -> None:
    """After a broker restart Mosquitto 2.0 has no shared subscription until a worker
    subscribes again, and answers PUBACK 16. The meter retries soon, not after the receipt
    timeout (here far longer than the wait below)."""
    worker = FakeWorker(pki, broker.port, policy=accept)
    settings = replace(FAST, republish_after_s=120.0, max_republish_after_s=120.0)

    async def scenario() -> MeterClient:
        async with Network() as network:
            meter = make_meter(pki, broker, network, meter_id, tmp_path, settings)
            meter.start()
            await wait_until(lambda: meter.connected, "meter connected")
            seq = submit(meter)  # nobody subscribes to readings yet: PUBACK 16
            await asyncio.sleep(0.5)
            await asyncio.to_thread(worker.start)
            try:
                await wait_until(lambda: seq in worker.seqs(meter_id), "the retried reading")
                async with asyncio.timeout(WAIT_S):
                    await meter.drain()
            finally:
                worker.stop()
            await meter.stop()
            return meter

    meter = asyncio.run(scenario())
    assert meter.stats.accepted == 1
    assert meter.stats.republished >= 1
