"""Every use of gmqtt's private internals, in one place, for gmqtt 0.8 (pinned in
pyproject; `tests/test_ingest_source.py` runs each of them against a real broker, and
`tests/test_ingest_startup_silent.py` `abort` against a broker that never answers).

gmqtt's own way to delay a PUBACK (`optimistic_acknowledgement=False`) runs the handler
as one task per message and writes one PUBACK per message: measured, about 20 us of
worker CPU per reading, a sixth of all of it. And gmqtt wraps every packet in an object
and routes it through four calls that format debug log arguments: ~2.5 us a packet, and
each reading brings a worker three (its PUBLISH and the PUBACKs of its receipt and
verified reading). So the source takes PUBLISH and PUBACK over: the connection's bytes
are split here (framing in `ingest._wire`) and those two packets handed to the source;
everything else still goes through gmqtt. What that needs of gmqtt, and nothing else:

- `Client._package_handler`: its `_handle_publish_packet` / `_handle_puback_packet`
  (resolved on the instance first) for packets gmqtt parses itself, such as those that
  arrive in the same read as the CONNACK; its `id_generator` for outbound packet ids;
  its `_resend_qos_callback`, because gmqtt replays the unacknowledged publishes in a task
  it starts at the CONNACK: a publish made before that task runs was sent twice (seen in
  one run in seven of `tests/test_ingest_source.py`). The source replays them itself, in
  the CONNACK's own call (`replay_unacknowledged`); and its `_clear_qos_callback`,
  because gmqtt discards them when the broker has lost the session: they are sent again
  as new publishes instead;
- `Client._connection`: `_protocol._read_packet` (replaced per connection),
  `_last_data_in` (gmqtt's keepalive reads it; so does `last_heard`), `send_package`,
  `put_package`, and `_transport`, to cut off a link whose broker does not answer its
  close or falls silent (`abort`);
- `PersistentStorage._messages`, to bound the outbound window, and the id generator's
  `_max`, where gmqtt keeps the broker's Receive Maximum from the CONNACK
  (`broker_receive_maximum`);
- the package handler's `_is_retryable_connack`, so that a refused first connection is
  retried by the caller alone, and the refusals of gmqtt's own reconnects reach the
  caller (`refusals_left_to_the_caller`), and `MQTTConnectError`'s `_code`, the
  refusal's reason code (`refusal_code`).

And one thing of asyncio's: under TLS, the socket transport beneath the TLS transport
(`_ssl_protocol._transport`), whose reading `read_directly` pauses after each read (see
there); without it, the TLS transport itself is paused, which saves less.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

from gmqtt import Client, MQTTConnectError
from gmqtt.mqtt.handler import MqttPackageHandler
from gmqtt.mqtt.package import Package
from gmqtt.mqtt.protocol import MQTTProtocol
from gmqtt.mqtt.utils import IdGenerator
from gmqtt.storage import PersistentStorage

from meterproof.ingest._wire import PUBACK, PUBLISH, Drop, split

#: What this module reaches into; checked at import, so a gmqtt that moved any of it fails
#: at start, not at the first packet.
_REQUIRED: Final = (
    (MQTTProtocol, "_read_packet"),
    (MqttPackageHandler, "_handle_publish_packet"),
    (MqttPackageHandler, "_handle_puback_packet"),
    (MqttPackageHandler, "current_connection"),
    (MqttPackageHandler, "_is_retryable_connack"),
    (IdGenerator, "next_id"),
    (IdGenerator, "free_id"),
)
_missing = [f"{cls.__name__}.{name}" for cls, name in _REQUIRED if not hasattr(cls, name)]
if not hasattr(IdGenerator(), "_max"):  # an instance's attribute: `broker_receive_maximum`
    _missing.append("IdGenerator._max")
if not hasattr(MQTTConnectError(0), "_code"):  # `refusal_code`
    _missing.append("MQTTConnectError._code")
if _missing:  # pragma: no cover - only a gmqtt other than the pinned one gets here
    raise ImportError(f"gmqtt lacks what ingest._gmqtt uses: {', '.join(_missing)}")

PacketHandler = Callable[[int, bytes], None]


class OutboundWindow(PersistentStorage):  # type: ignore[misc]
    """gmqtt's store of unacknowledged outbound QoS 1 publishes, which also bounds them.

    Once the broker's Receive Maximum worth of ids is in flight, gmqtt raises OverflowError
    and Mosquitto disconnects a client that exceeds the window (measured in a backlog drain
    announcing 2 publishes per reading). `wait_for_room` lets the worker wait for PUBACKs.
    `limit` is what the settings ask; `fit` narrows it to what each connection's broker
    allows.
    """

    #: Ids gmqtt's allocator keeps back from the broker's Receive Maximum: its last one,
    #: which it never hands out, and a SUBSCRIBE and an UNSUBSCRIBE (`ingest.follow`).
    RESERVED_IDS: Final = 3

    def __init__(self, limit: int) -> None:
        super().__init__()
        if not hasattr(self, "_messages"):  # pragma: no cover - another gmqtt
            raise ImportError("gmqtt's PersistentStorage no longer keeps _messages")
        self._asked = limit
        self.limit = limit
        self._room = asyncio.Event()
        self._room.set()

    def fit(self, receive_maximum: int) -> None:
        """At most `limit` publishes in flight, and fewer than the broker's Receive
        Maximum: a `publish_window` above it would leave gmqtt without an id to give."""
        self.limit = max(1, min(self._asked, receive_maximum - self.RESERVED_IDS))
        if len(self._messages) >= self.limit:
            self._room.clear()
        else:
            self._room.set()

    def push_message(self, mid: int, raw_package: bytes) -> None:
        super().push_message(mid, raw_package)
        if len(self._messages) >= self.limit:
            self._room.clear()

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        if len(self._messages) < self.limit:
            self._room.set()

    @property
    def full(self) -> bool:
        return not self._room.is_set()

    async def wait_for_room(self) -> None:
        await self._room.wait()


def take_over(client: Client, *, on_publish: PacketHandler, on_puback: PacketHandler) -> None:
    """PUBLISH and PUBACK that gmqtt parses itself go to the two handlers too (gmqtt reads
    a connection's first bytes, CONNACK and whatever follows it in the same read), and
    gmqtt's own replay after a resumed session, and its discarding of the unacknowledged
    publishes after a lost one, are switched off: the caller replays with
    `replay_unacknowledged` from its CONNACK callback."""
    handler = client._package_handler
    for name in ("_resend_qos_callback", "_clear_qos_callback"):
        if not hasattr(handler, name):  # pragma: no cover - another gmqtt
            raise ImportError(f"gmqtt's package handler no longer has {name}")
    handler._handle_publish_packet = on_publish
    handler._handle_puback_packet = on_puback
    handler._resend_qos_callback = _replayed_by_the_caller
    handler._clear_qos_callback = _kept_for_the_caller


async def _replayed_by_the_caller() -> None:
    """gmqtt's replay task, with nothing left to do."""


def _kept_for_the_caller() -> None:
    """gmqtt's discarding of the unacknowledged publishes, left undone."""


def refusals_left_to_the_caller(
    client: Client, *, until: Callable[[], bool], afterwards: Callable[[int, bool], None]
) -> None:
    """Until `until()` is true (the caller's first accepted connection), a refused CONNACK
    only makes `Client.connect` raise it (`refusal_code`): the caller decides whether to
    try again, with its own backoff. gmqtt would otherwise connect again by itself 1 s
    later, a second connection under the same client id racing the caller's next attempt.
    Afterwards gmqtt's own judgement applies to the refusals of its reconnects, and each
    is told to `afterwards(reason_code, retried)`: gmqtt raises nothing for them. (gmqtt
    logs such a refusal as "permanent": it only means gmqtt does not retry it.)"""
    handler = client._package_handler
    retryable = handler._is_retryable_connack

    def judged(result: int) -> bool:
        if not until():
            return False
        retried = bool(retryable(result))
        afterwards(result, retried)
        return retried

    handler._is_retryable_connack = judged


def refusal_code(exc: MQTTConnectError) -> int:
    """The reason code of the CONNACK gmqtt raised for (10: one it could not parse)."""
    code: int = exc._code
    return code


def replay_unacknowledged(client: Client, window: OutboundWindow) -> int:
    """Send every publish the broker has not acknowledged again, on the current connection
    and before anything else can be published on it; returns how many. Call it from every
    CONNACK: on a resumed session they finish their flow; on a session the broker lost
    (expired, or gone in a crash) they are new publishes, under ids that session never
    used, so the receipts and verified readings of committed batches still go out and
    their ids are freed by the PUBACKs."""
    packets = [package for _mid, package in window.get_all()]
    if packets:
        client._connection.send_package(b"".join(packets))
    return len(packets)


def read_directly(
    client: Client,
    *,
    on_publish: PacketHandler,
    on_puback: PacketHandler,
    on_broken: Callable[[Drop], None],
    pause_s: float = 0.0,
) -> None:
    """Split the current connection's incoming bytes here rather than in gmqtt. Call it
    from the CONNACK: it applies to that connection only. Bytes of a superseded connection
    are dropped as gmqtt drops them; a stream that cannot be split is reported to
    `on_broken` and the link closed (gmqtt's answer to -1).

    With `pause_s`, the socket is not read again for that long after a read that found
    the link busy (`ReadPause`), so that one wake-up of the loop (and one TLS read, one task
    step of gmqtt's reader) takes several readings at a live trickle, where each would
    otherwise come alone. What arrives meanwhile waits in the kernel's buffer; a backlog
    loses little by it, as each read then takes what the kernel gathered, up to the TLS
    layer's 256 KiB."""
    connection = client._connection
    handler = client._package_handler
    transport: asyncio.BaseTransport = connection._protocol._transport
    socket_transport = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
    paused = ReadPause(socket_transport or transport, pause_s) if pause_s > 0 else None

    def read_packets(data: bytes) -> int:
        if handler.current_connection is not connection:
            return len(data)
        connection._last_data_in = time.monotonic()
        frames = split(data)
        for first, body in frames.packets:
            kind = first & 0xF0
            if kind == PUBLISH:
                on_publish(first, body)
            elif kind == PUBACK:
                on_puback(first, body)
            else:
                connection.put_package(Package(first, body))
        if frames.broken is not None:
            on_broken(frames.broken)
            return -1
        if paused is not None:
            paused.start()
        return frames.consumed

    connection._protocol._read_packet = read_packets


class ReadPause:
    """Stops a transport's reading for `seconds`, then resumes it, after a read that came
    within `seconds` of the read before it or of the end of a pause: the link is busy, and
    the pause gathers what comes next. After a quiet spell a read is not followed by a
    pause. At a trickle the pause would gather nothing, while its timer and its two calls
    to the poller woke the loop once more a reading.

    asyncio ignores a pause of a closing transport and a resume of one not paused, so a
    link lost meanwhile or the TLS layer's own flow control (which also pauses and
    resumes the socket) is safe."""

    def __init__(self, transport: asyncio.BaseTransport, seconds: float) -> None:
        self._transport = transport
        self._seconds = seconds
        self._busy_until = float("-inf")  # loop time before which a read finds it busy

    def start(self) -> None:
        transport = self._transport
        if not (isinstance(transport, asyncio.ReadTransport) and transport.is_reading()):
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._busy_until:
            self._busy_until = now + self._seconds
            return
        transport.pause_reading()
        loop.call_later(self._seconds, transport.resume_reading)
        self._busy_until = now + 2 * self._seconds


def last_heard(client: Client) -> float:
    """When (`time.monotonic`) the client's connection last received anything; 0.0
    without a connection."""
    connection = client._connection
    return 0.0 if connection is None else float(connection._last_data_in)


def abort(client: Client) -> None:
    """Close the client's connection at once, without waiting for the broker to answer
    the TLS close_notify (asyncio waits up to 30 s for that)."""
    connection = client._connection
    if connection is not None:
        connection._transport.abort()


def write_raw(client: Client, data: bytes) -> bool:
    """Bytes straight onto the client's connection (gmqtt exposes no raw write); False
    when there is no open connection."""
    connection = client._connection
    if connection is None or connection.is_closing():
        return False
    connection.send_package(data)
    return True


def next_packet_id(client: Client) -> int:
    """An outbound packet id from gmqtt's own allocator, so it never collides with the
    SUBSCRIBE ids gmqtt allocates."""
    value: int = client._package_handler.id_generator.next_id()
    return value


def broker_receive_maximum(client: Client) -> int:
    """The broker's Receive Maximum for the current connection: gmqtt applies its
    CONNACK's (65,535 when it names none) to the id generator before `on_connect`."""
    value: int = client._package_handler.id_generator._max
    return value


def free_packet_id(client: Client, packet_id: int) -> None:
    client._package_handler.id_generator.free_id(packet_id)
