"""The MQTT source: a persistent MQTT 5 session on the shared subscription, acknowledging
each message only when the worker says its outcome is committed.

gmqtt's own way to delay a PUBACK (`optimistic_acknowledgement=False`) runs the handler as
one task per message and writes one PUBACK per message: measured, that cost about 20 us of
worker CPU per reading, a sixth of all of it. So the source takes gmqtt's PUBLISH parsing
over: each QoS 1 PUBLISH becomes a `Delivery` handed synchronously to the worker, and
`ack` writes the PUBACKs of a committed batch in one write. For the same reason the
connection's bytes are split into packets here, and PUBLISH and PUBACK handled directly
(`_read_directly`); everything else still goes through gmqtt. A delivery that is never
acknowledged (worker killed, batch not committed at shutdown) is redelivered by the broker
to the session on reconnect. A delivery from an earlier connection is not acknowledged on
a later one: the broker resends it there under the same packet id, and only that copy's
PUBACK is unambiguous (the id may be reused once acknowledged).

The broker's inflight window (`max_inflight_messages`, and `receive_maximum` here) bounds
how many deliveries are pending, which bounds the worker's queue.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv50
from gmqtt.mqtt.package import Package
from gmqtt.storage import PersistentStorage

from meterproof.ingest.records import Message
from meterproof.schemas.timestamps import wall_ms

READINGS_FILTER: Final = "meters/+/readings"
log = structlog.get_logger("ingest.source")

_PUBACK: Final = struct.Struct("!BBH")  # v5 short form: remaining length 2 = success
_PUBLISH_QOS1: Final = 0x32
_PUBLISH: Final = 0x30
_PUBACK_CMD: Final = 0x40
_U16: Final = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class Delivery:
    """A PUBLISH as received, with what its PUBACK needs: the broker's packet id (None at
    QoS 0: nothing to acknowledge) and the connection it arrived on."""

    message: Message
    mid: int | None
    link: int


#: The worker's entry point: called synchronously for every delivery, in arrival order.
Handler = Callable[[Delivery], None]


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    ca: Path
    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


class OutboundWindow(PersistentStorage):  # type: ignore[misc]
    """gmqtt's store of unacknowledged outbound QoS 1 publishes, which also bounds them.

    Once the broker's Receive Maximum worth of ids is in flight, gmqtt raises OverflowError
    and Mosquitto disconnects a client that exceeds the window (measured in a backlog drain
    announcing 2 publishes per reading). `wait_for_room` lets the worker wait for PUBACKs.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self._room = asyncio.Event()
        self._room.set()

    def push_message(self, mid: int, raw_package: bytes) -> None:
        super().push_message(mid, raw_package)
        if len(self._messages) >= self.limit:
            self._room.clear()

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        if len(self._messages) < self.limit:
            self._room.set()

    def clear(self) -> None:
        super().clear()
        self._room.set()

    @property
    def full(self) -> bool:
        return not self._room.is_set()

    async def wait_for_room(self) -> None:
        await self._room.wait()


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, byte = divmod(value, 128)
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def publish_packet(topic: bytes, payload: bytes, mid: int) -> bytes:
    """An MQTT 5 QoS 1 PUBLISH without properties."""
    body_len = 2 + len(topic) + 2 + 1 + len(payload)
    return b"".join(
        (
            bytes((_PUBLISH_QOS1,)),
            encode_varint(body_len),
            _U16.pack(len(topic)),
            topic,
            _U16.pack(mid),
            b"\x00",
            payload,
        )
    )


def parse_publish(cmd: int, raw: bytes) -> tuple[str, int | None, bytes]:
    """(topic, packet id or None at QoS 0, payload) of an MQTT 5 PUBLISH body. Properties
    are skipped: the worker uses none, and no topic alias can arrive because the session
    never offers a Topic Alias Maximum."""
    topic_end = 2 + (raw[0] << 8 | raw[1])
    topic = raw[2:topic_end].decode("utf-8")
    pos = topic_end
    mid = None
    if cmd & 0x06:
        mid = raw[pos] << 8 | raw[pos + 1]
        pos += 2
    properties = read_varint(raw, pos, len(raw))
    if properties is None:
        raise ValueError("PUBLISH ends inside its properties length")
    length, pos = properties
    return topic, mid, raw[pos + length :]


def read_varint(data: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """MQTT's variable byte integer at data[pos:end]: (value, position after it), or None
    when the bytes end first. ValueError past four bytes, as the protocol allows no more."""
    value = shift = 0
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise ValueError("variable byte integer longer than four bytes")
    return None


PacketHandler = Callable[[int, bytes], None]


def read_directly(client: Client, *, on_publish: PacketHandler, on_puback: PacketHandler) -> None:
    """Split the connection's incoming bytes into packets here rather than in gmqtt, and
    hand PUBLISH and PUBACK bodies to the two handlers.

    gmqtt wraps every packet in an object and routes it through four calls that format
    debug log arguments: ~2.5 us a packet, and each reading brings a worker three (its
    PUBLISH and the PUBACKs of its receipt and verified reading). Call it from the CONNACK:
    it applies to that connection only. Packets other than PUBLISH and PUBACK still go
    through gmqtt, and bytes of a superseded connection are dropped as gmqtt drops them.
    """
    connection = client._connection
    handler = client._package_handler

    def read_packets(data: bytes) -> int:
        if handler.current_connection is not connection:
            return len(data)
        connection._last_data_in = time.monotonic()  # gmqtt's keepalive reads it
        pos, end = 0, len(data)
        while end - pos >= 2:
            try:
                remaining = read_varint(data, pos + 1, end)
            except ValueError:
                return -1  # gmqtt's answer to a malformed length: drop the link
            if remaining is None:
                return pos
            length, start = remaining
            if start + length > end:
                return pos
            cmd = data[pos]
            kind = cmd & 0xF0
            if kind == _PUBLISH:
                on_publish(cmd, data[start : start + length])
            elif kind == _PUBACK_CMD:
                on_puback(cmd, data[start : start + length])
            else:
                connection.put_package(Package(cmd, data[start : start + length]))
            pos = start + length
        return pos

    connection._protocol._read_packet = read_packets


def puback_packet(mid: int) -> bytes:
    """PUBACK, success, in MQTT 5's short form."""
    return _PUBACK.pack(0x40, 2, mid)


def write_raw(client: Client, data: bytes) -> bool:
    """Bytes straight onto the client's connection (gmqtt exposes no raw write); False
    when there is no open connection."""
    connection = client._connection
    if connection is None or connection.is_closing():
        return False
    connection.send_package(data)
    return True


class MqttSource:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls: TlsIdentity,
        client_id: str,
        share_group: str,
        session_expiry_s: int,
        receive_maximum: int,
        publish_window: int,
        handler: Handler,
    ) -> None:
        self._host = host
        self._port = port
        self._tls = tls
        self._handler = handler
        self._topic = f"$share/{share_group}/{READINGS_FILTER}"
        # clean_start=False from the very first connect: a v5 session first created with
        # clean start does not survive a broker restart on this Mosquitto (facts.md).
        self._window = OutboundWindow(publish_window)
        self._client = Client(
            client_id,
            clean_session=False,
            persistent_storage=self._window,
            optimistic_acknowledgement=False,
            session_expiry_interval=session_expiry_s,
            receive_maximum=receive_maximum,
        )
        self._client.set_config({"reconnect_retries": -1, "reconnect_delay": 1})
        # Where gmqtt is bypassed (see the module docstring): its handler table resolves
        # `_handle_<packet>_packet` on the instance first.
        self._packets = self._client._package_handler
        self._packets._handle_publish_packet = self._on_publish
        self._packets._handle_puback_packet = self._on_puback
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._link = 0
        self.connected = asyncio.Event()

    async def start(self) -> None:
        await self._client.connect(
            self._host, self._port, ssl=self._tls.context(), version=MQTTv50, keepalive=30
        )

    def _on_connect(self, client: Client, flags: int, rc: int, properties: Any) -> None:  # noqa: ANN401
        # A new link: deliveries of the previous one are redelivered on this one.
        self._link += 1
        self._read_directly(self._link)
        # Subscribing again on a resumed session is harmless and covers a session the
        # broker lost (expired, or a broker without persistence).
        client.subscribe(self._topic, qos=1)
        self.connected.set()
        log.info("broker_connected", topic=self._topic, session_present=bool(flags))

    def _on_disconnect(self, client: Client, packet: Any, exc: Any = None) -> None:  # noqa: ANN401
        self.connected.clear()
        log.warning("broker_disconnected", error=None if exc is None else str(exc))

    def _on_publish(self, cmd: int, raw: bytes, link: int | None = None) -> None:
        try:
            topic, mid, payload = parse_publish(cmd, raw)
        except (IndexError, UnicodeDecodeError):
            log.critical("invalid_publish_skipped", size=len(raw))
            return
        message = Message(topic, payload, wall_ms())
        self._handler(Delivery(message, mid, self._link if link is None else link))

    def _on_puback(self, cmd: int, raw: bytes) -> None:
        """The broker took one of our publishes: its id and its place in the window are free."""
        mid = raw[0] << 8 | raw[1]
        self._packets.id_generator.free_id(mid)
        self._window.remove_message_by_mid(mid)

    def _read_directly(self, link: int) -> None:
        read_directly(
            self._client,
            on_publish=lambda cmd, raw: self._on_publish(cmd, raw, link),
            on_puback=self._on_puback,
        )

    def _transport_write(self, data: bytes) -> bool:
        return write_raw(self._client, data)

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        """PUBACK (success) every delivery of the current link in one write; call only once
        their outcomes are committed. Returns how many were acknowledged."""
        link = self._link
        acks = [puback_packet(d.mid) for d in deliveries if d.mid is not None and d.link == link]
        if acks and self._transport_write(b"".join(acks)):
            return len(acks)
        return 0

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """QoS 1, within the outbound window, written in as few writes as the window allows;
        each packet is kept in the window's store, and gmqtt resends it after a reconnect
        until the broker acknowledges it."""
        ids = self._client._package_handler.id_generator
        chunk: list[bytes] = []
        for topic, payload in items:
            if self._window.full:
                self._transport_write(b"".join(chunk))
                chunk = []
                await self._window.wait_for_room()
            mid = ids.next_id()
            packet = publish_packet(topic.encode(), payload, mid)
            self._window.push_message(mid, packet)
            chunk.append(packet)
        if chunk:
            self._transport_write(b"".join(chunk))

    async def stop(self) -> None:
        await self._client.disconnect()
