"""The API's broker connection: what its in-process worker announces after a commit
(verified readings, integrators' consented copies) goes to Mosquitto like an MQTT
worker's, so live subscribers see readings whichever door they came through.

The API publishes with a certificate of its own (`api_mqtt_identity`, an ingest worker
identity nothing else uses: the broker grants exactly those rights, write on `verified/#`
and the integrators' feeds, and makes the CN the client id, so sharing one with a worker
would cut both off). It never subscribes.

The broker may be away: HTTP answers never wait for it. Items queue here (at most
`api_republish_max_pending`; beyond that new ones are dropped, counted and logged)
and leave the queue only once the broker has acknowledged them (PUBACK), so a broker
restart or a lost connection loses nothing; after a reconnect the unacknowledged ones
are sent again (at least once, as QoS 1 promises). A crash of the API process loses
what was still queued, as a crash of an MQTT worker loses its unannounced verified
copies: the readings themselves are committed, and the bridge anchors from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import structlog
from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv50
from gmqtt.storage import PersistentStorage
from prometheus_client import Counter, Gauge

from meterproof.backoff import Backoff
from meterproof.certs.layout import PkiLayout
from meterproof.certs.tls import client_context

log = structlog.get_logger("api.republish")

PENDING = Gauge("meterproof_api_republish_pending", "announcements not yet acknowledged")
PUBLISHED = Counter("meterproof_api_republished_total", "announcements the broker acknowledged")
DROPPED = Counter("meterproof_api_republish_dropped_total", "announcements dropped: queue full")
#: Publishes in flight at once, well inside the broker's max_inflight_messages.
_CHUNK: Final = 500
_CONNECT_TIMEOUT_S: Final = 10.0


class _Acks(PersistentStorage):  # type: ignore[misc]
    """gmqtt's store of in-flight publishes, telling which packet ids were acknowledged
    (gmqtt also clears it when the broker has no session: that is not an acknowledgement)."""

    def __init__(self) -> None:
        super().__init__()
        self.pushed: list[int] = []
        self.acked: set[int] = set()
        self.changed = asyncio.Event()

    def push_message(self, mid: int, raw_package: bytes) -> None:
        super().push_message(mid, raw_package)
        self.pushed.append(mid)

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        self.acked.add(mid)
        self.changed.set()

    def clear(self) -> None:
        super().clear()
        self.changed.set()


class Republisher:
    def __init__(
        self, *, pki_root: Path, identity: str, host: str, port: int, max_pending: int
    ) -> None:
        pki = PkiLayout(pki_root)
        files = pki.service(identity)
        self._tls = client_context(cert=files.cert, key=files.key, ca_cert=pki.ca_cert)
        self._identity = identity
        self._host = host
        self._port = port
        self._pending: deque[tuple[str, bytes]] = deque()
        self._max_pending = max_pending
        self._more = asyncio.Event()
        self._client: Client | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None and bool(self._client.is_connected)

    def offer(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Queue announcements of a committed batch; returns at once."""
        if not items:
            return
        room = max(0, self._max_pending - len(self._pending))
        self._pending.extend(items[:room])
        over = len(items) - room
        if over > 0:  # the oldest may be in flight: the newest give way
            DROPPED.inc(over)
            log.error("republish_dropped", dropped=over, max_pending=self._max_pending)
        PENDING.set(len(self._pending))
        self._more.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Connect (retrying with backoff until `stop`), then send what is queued."""
        acks = _Acks()
        client = Client(self._identity, clean_session=False, persistent_storage=acks,
                        session_expiry_interval=3600)  # fmt: skip
        client.set_config({"reconnect_retries": -1, "reconnect_delay": 1})
        backoff = Backoff(0.5, 10.0)
        while not stop.is_set():
            try:
                await asyncio.wait_for(
                    client.connect(self._host, self._port, ssl=self._tls, version=MQTTv50,
                                   keepalive=30),
                    _CONNECT_TIMEOUT_S,
                )  # fmt: skip
                break
            except Exception as exc:  # noqa: BLE001 - whatever refused the connection, retry
                delay = backoff.next_s()
                log.warning("republish_broker_unreachable", error=str(exc), retry_in_s=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        else:
            return
        self._client = client
        log.info("republish_connected", identity=self._identity)
        try:
            await self._drain(client, acks, stop)
        finally:
            self._client = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 5)
            log.info("republish_stopped", left_unsent=len(self._pending))

    async def _drain(self, client: Client, acks: _Acks, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not self._pending or not client.is_connected:
                self._more.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._more.wait(), 0.5)
                continue
            chunk = [self._pending[i] for i in range(min(_CHUNK, len(self._pending)))]
            acks.pushed.clear()
            acks.acked.clear()
            try:
                for topic, body in chunk:
                    client.publish(topic, body, qos=1)
            except Exception as exc:  # noqa: BLE001 - a connection lost mid-chunk: resent
                log.warning("republish_interrupted", error=str(exc))
            mids = set(acks.pushed)
            while not mids <= acks.acked and client.is_connected and not stop.is_set():
                acks.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(acks.changed.wait(), 1.0)
            if mids <= acks.acked:
                for _ in chunk:
                    self._pending.popleft()
                PUBLISHED.inc(len(chunk))
                PENDING.set(len(self._pending))
            else:
                log.warning("republish_interrupted", unacknowledged=len(mids - acks.acked))
