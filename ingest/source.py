"""The MQTT source: a persistent MQTT 5 session on the shared subscription, acknowledging
each message only when the worker says its outcome is committed.

Each QoS 1 PUBLISH becomes a `Delivery` handed synchronously to the worker, and `ack`
writes the PUBACKs of a committed batch in one write (why gmqtt's own delayed PUBACK is
not used: `ingest._gmqtt`). The bytes are framed by `ingest._wire`: a packet that breaks
the protocol is dropped, counted by reason (`meterproof_mqtt_packets_dropped_total`) and
logged, never raised into the event loop. A dropped QoS 1 PUBLISH stays in flight at the
broker, which validated its topic itself: only a broken broker or a forged stream gets
there.

A delivery that is never acknowledged (worker killed, batch not committed at shutdown) is
redelivered by the broker to the session on reconnect. A delivery from an earlier
connection is not acknowledged on a later one: the broker resends it there under the same
packet id, and only that copy's PUBACK is unambiguous (the id may be reused once
acknowledged). The broker's inflight window (`max_inflight_messages`, and
`receive_maximum` here) bounds how many deliveries are pending, which bounds the worker's
queue.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv50

from meterproof.certs.layout import PkiLayout
from meterproof.certs.tls import client_context
from meterproof.ingest import _gmqtt, _wire
from meterproof.ingest.records import Message
from meterproof.ingest.settings import IngestSettings
from meterproof.ingest.telemetry import PACKETS_DROPPED
from meterproof.schemas import topics
from meterproof.schemas.timestamps import wall_ms

log = structlog.get_logger("ingest.source")


@dataclass(frozen=True, slots=True)
class Delivery:
    """A PUBLISH as received, with what its PUBACK needs: the broker's packet id (None at
    QoS 0: nothing to acknowledge) and the connection it arrived on."""

    message: Message
    mid: int | None
    link: int


#: The worker's entry point: called synchronously for every delivery, in arrival order.
Handler = Callable[[Delivery], None]


class Source(Protocol):
    """Where a worker's messages come from and where its receipts and verified readings
    go; `MqttSource` in production, anything of this shape in a test."""

    @property
    def connected(self) -> bool:
        """Deliveries can arrive: connected and subscribed."""

    async def start(self, deliver: Handler) -> None:
        """Begin delivering, in arrival order, to `deliver`."""

    async def stop(self) -> None:
        """No more deliveries and no more acknowledgements."""

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        """Acknowledge committed deliveries; returns how many were acknowledged."""

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Publish (topic, payload) pairs at QoS 1, in order."""


def _not_started(delivery: Delivery) -> None:
    raise RuntimeError("a delivery before MqttSource.start")


class MqttSource:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        client_id: str,
        share_group: str,
        session_expiry_s: int,
        receive_maximum: int,
        publish_window: int,
    ) -> None:
        self._host = host
        self._port = port
        self._tls = tls
        self._deliver: Handler = _not_started
        self._topic = topics.shared(share_group, topics.READINGS_FILTER)
        # clean_start=False from the very first connect: a v5 session first created with
        # clean start does not survive a broker restart on Mosquitto 2.0.
        self._window = _gmqtt.OutboundWindow(publish_window)
        self._client = Client(
            client_id,
            clean_session=False,
            persistent_storage=self._window,
            optimistic_acknowledgement=False,
            session_expiry_interval=session_expiry_s,
            receive_maximum=receive_maximum,
        )
        self._client.set_config({"reconnect_retries": -1, "reconnect_delay": 1})
        _gmqtt.take_over(self._client, on_publish=self._on_publish, on_puback=self._on_puback)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._link = 0
        self._subscribed = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._subscribed.is_set()

    async def start(self, deliver: Handler) -> None:
        self._deliver = deliver
        await self._client.connect(
            self._host, self._port, ssl=self._tls, version=MQTTv50, keepalive=30
        )

    def _on_connect(self, client: Client, flags: int, rc: int, properties: Any) -> None:  # noqa: ANN401
        # A new link: deliveries of the previous one are redelivered on this one.
        self._link += 1
        link = self._link
        _gmqtt.read_directly(
            client,
            on_publish=lambda first, body: self._on_publish(first, body, link),
            on_puback=self._on_puback,
            on_broken=self._on_broken,
        )
        # Subscribing again on a resumed session is harmless and covers a session the
        # broker lost (expired, or a broker without persistence).
        client.subscribe(self._topic, qos=1)
        log.info("broker_connected", topic=self._topic, session_present=bool(flags))

    def _on_subscribe(self, client: Client, mid: int, granted: Sequence[int], props: Any) -> None:  # noqa: ANN401
        if any(code >= 0x80 for code in granted):
            log.error("broker_refused_subscription", topic=self._topic, codes=list(granted))
            return
        self._subscribed.set()
        log.info("broker_subscribed", topic=self._topic)

    def _on_disconnect(self, client: Client, packet: Any, exc: Any = None) -> None:  # noqa: ANN401
        self._subscribed.clear()
        log.warning("broker_disconnected", error=None if exc is None else str(exc))

    def _on_publish(self, first: int, body: bytes, link: int | None = None) -> None:
        publish = _wire.parse_publish(first, body)
        if isinstance(publish, _wire.Drop):
            self._dropped(publish, first, len(body))
            return
        message = Message(publish.topic, publish.payload, wall_ms())
        self._deliver(Delivery(message, publish.packet_id, self._link if link is None else link))

    def _on_puback(self, first: int, body: bytes) -> None:
        """The broker took one of our publishes: its id and its place in the window are free."""
        puback = _wire.parse_puback(first, body)
        if isinstance(puback, _wire.Drop):
            self._dropped(puback, first, len(body))
            return
        _gmqtt.free_packet_id(self._client, puback.packet_id)
        self._window.remove_message_by_mid(puback.packet_id)
        if puback.reason_code >= 0x80:
            log.error("broker_refused_publish", reason_code=puback.reason_code)

    def _on_broken(self, reason: _wire.Drop) -> None:
        PACKETS_DROPPED.labels(reason=reason.value).inc()
        log.error("mqtt_stream_broken", reason=reason.value, link=self._link)

    @staticmethod
    def _dropped(reason: _wire.Drop, first: int, size: int) -> None:
        PACKETS_DROPPED.labels(reason=reason.value).inc()
        log.error("mqtt_packet_dropped", reason=reason.value, first_byte=first, size=size)

    def _transport_write(self, data: bytes) -> bool:
        return _gmqtt.write_raw(self._client, data)

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        """PUBACK (success) every delivery of the current link in one write; call only once
        their outcomes are committed. Returns how many were acknowledged."""
        link = self._link
        acks = [
            _wire.puback_packet(d.mid) for d in deliveries if d.mid is not None and d.link == link
        ]
        if acks and self._transport_write(b"".join(acks)):
            return len(acks)
        return 0

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """QoS 1, within the outbound window, written in as few writes as the window allows;
        each packet is kept in the window's store, and gmqtt resends it after a reconnect
        until the broker acknowledges it."""
        chunk: list[bytes] = []
        for topic, payload in items:
            if self._window.full:
                self._transport_write(b"".join(chunk))
                chunk = []
                await self._window.wait_for_room()
            mid = _gmqtt.next_packet_id(self._client)
            packet = _wire.publish_packet(topic.encode(), payload, mid)
            self._window.push_message(mid, packet)
            chunk.append(packet)
        if chunk:
            self._transport_write(b"".join(chunk))

    async def stop(self) -> None:
        await self._client.disconnect()


def mqtt_source(settings: IngestSettings) -> MqttSource:
    """The worker's source as its settings describe it: its own certificate (TLS 1.3)."""
    pki = PkiLayout(settings.pki_root)
    identity = pki.service(settings.identity)
    return MqttSource(
        host=settings.mqtt_host,
        port=settings.mqtt_port,
        tls=client_context(cert=identity.cert, key=identity.key, ca_cert=pki.ca_cert),
        client_id=settings.client_id,
        share_group=settings.share_group,
        session_expiry_s=settings.session_expiry_s,
        receive_maximum=settings.receive_maximum,
        publish_window=settings.publish_window,
    )
