"""The MQTT source: a persistent MQTT 5 session on the shared subscription, acknowledging
each message only when the worker says its outcome is committed.

gmqtt with `optimistic_acknowledgement=False` runs the async handler as a task per message
and sends the PUBACK when that task returns; our handler returns only after the commit. A
handler that never returns (worker killed, batch not committed at shutdown) sends no PUBACK,
and the broker redelivers the message to the session on reconnect. The broker's inflight
window (`max_inflight_messages`, and `receive_maximum` here) bounds how many are pending.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv50
from gmqtt.storage import PersistentStorage

from ingest.records import Message

READINGS_FILTER: Final = "meters/+/readings"
log = structlog.get_logger("ingest.source")

#: The worker's entry point: returns once the message's outcome is durable.
Handler = Callable[[Message], Awaitable[None]]


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

    gmqtt sends as fast as it is asked and, once the broker's Receive Maximum worth of ids
    is in flight, raises OverflowError (measured: a backlog drain announcing 2 publishes per
    reading got there, and Mosquitto disconnects a client that exceeds the window).
    `wait_for_room` lets the worker wait for PUBACKs instead.
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

    async def wait_for_room(self) -> None:
        await self._room.wait()


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
        self._client.on_message = self._on_message
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self.connected = asyncio.Event()

    async def start(self) -> None:
        await self._client.connect(
            self._host, self._port, ssl=self._tls.context(), version=MQTTv50, keepalive=30
        )

    def _on_connect(self, client: Client, flags: int, rc: int, properties: Any) -> None:  # noqa: ANN401
        # Subscribing again on a resumed session is harmless and covers a session the
        # broker lost (expired, or a broker without persistence).
        client.subscribe(self._topic, qos=1)
        self.connected.set()
        log.info("broker_connected", topic=self._topic, session_present=bool(flags))

    def _on_disconnect(self, client: Client, packet: Any, exc: Any = None) -> None:  # noqa: ANN401
        self.connected.clear()
        log.warning("broker_disconnected", error=None if exc is None else str(exc))

    async def _on_message(
        self,
        client: Client,
        topic: str,
        payload: bytes,
        qos: int,
        properties: Any,  # noqa: ANN401
    ) -> int:
        await self._handler(Message(topic, payload, time.time_ns() // 1_000_000))
        return 0  # PUBACK "success": sent by gmqtt only now, after the commit

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """QoS 1, within the outbound window; gmqtt keeps it and resends it after a reconnect
        until the broker acknowledges it."""
        await self._window.wait_for_room()
        self._client.publish(topic, payload, qos=1, retain=retain)

    async def stop(self) -> None:
        await self._client.disconnect()
