"""The ingest side as the meter tests need it: `FakeWorker`, an ingest worker identity of
its own on a persistent shared subscription (clean_start=False from its first connect),
recording every reading the broker delivers and answering with the receipts its `Policy`
says (`accept`, or a test's own)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from ingest_harness import fresh_ingest_identity
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from waiting import WITHIN_S

from meterproof.certs.layout import PkiLayout
from meterproof.config import new_share_group
from meterproof.meter.identity import client_tls
from meterproof.schemas.codec import decode_reading
from meterproof.schemas.reading import Receipt, ReceiptStatus
from meterproof.schemas.signing import reading_hash, signing_bytes


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
        assert self._subscribed.wait(WITHIN_S), "no SUBACK"

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
