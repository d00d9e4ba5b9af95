"""The API's broker connections: what its in-process worker announces after a commit
(verified readings, integrators' consented copies) goes to every broker of
`settings.brokers()`, as an MQTT worker's `BrokerSet` sends it, so live subscribers see
readings whichever door they came through and whichever broker they are on.

The API publishes as the `api` service identity (`api_mqtt_identity` may name another,
such as a spare `ingest-N`): the broker lets it write `verified/#` and the integrators'
feeds and read nothing, and makes the CN the client id, so one API process per identity.
It never subscribes.

A broker may be away: HTTP answers never wait for it, nor does any other broker. Each
broker has its own queue (at most `api_republish_max_pending` items; beyond that new ones
are dropped for that broker, counted and logged), and an item leaves a broker's queue only
once that broker has acknowledged it (PUBACK), so a broker restart or a lost connection
loses nothing; after a reconnect the unacknowledged ones are sent again (at least once, as
QoS 1 promises). A crash of the API process loses what was still queued, as a crash of an
MQTT worker loses its unannounced verified copies: the readings themselves are committed,
and the bridge anchors from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from ssl import SSLContext
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

PENDING = Gauge(
    "meterproof_api_republish_pending", "announcements not yet acknowledged", ["broker"]
)
PUBLISHED = Counter(
    "meterproof_api_republished_total", "announcements the broker acknowledged", ["broker"]
)
DROPPED = Counter(
    "meterproof_api_republish_dropped_total", "announcements dropped: queue full", ["broker"]
)
#: Publishes in flight at once, well inside the broker's max_inflight_messages.
_CHUNK: Final = 500
_CONNECT_TIMEOUT_S: Final = 10.0


class _Acks(PersistentStorage):  # type: ignore[misc]
    """gmqtt's store of in-flight publishes, telling which packet ids were acknowledged
    and whether gmqtt dropped them unacknowledged (`lost`: it clears the store when the
    broker comes back without our session; that is no acknowledgement)."""

    def __init__(self) -> None:
        super().__init__()
        self.pushed: list[int] = []
        self.acked: set[int] = set()
        self.lost = False
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
        self.lost = True
        self.changed.set()


class Republisher:
    """One `BrokerQueue` per broker: every announcement is offered to each."""

    def __init__(
        self,
        *,
        pki_root: Path,
        identity: str,
        brokers: Sequence[tuple[str, int]],
        max_pending: int,
    ) -> None:
        if not brokers:
            raise ValueError("the republisher needs at least one broker")
        pki = PkiLayout(pki_root)
        files = pki.service(identity)
        tls = client_context(cert=files.cert, key=files.key, ca_cert=pki.ca_cert)
        self.queues = [
            BrokerQueue(identity=identity, host=host, port=port, tls=tls, max_pending=max_pending)
            for host, port in brokers
        ]

    def offer(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Queue announcements of a committed batch for every broker; returns at once."""
        for queue in self.queues:
            queue.offer(items)

    async def run(self, stop: asyncio.Event) -> None:
        """Each broker's connection on its own, until `stop`."""
        await asyncio.gather(*(queue.run(stop) for queue in self.queues))


class BrokerQueue:
    """The announcements one broker has not acknowledged yet, and its connection."""

    def __init__(
        self, *, identity: str, host: str, port: int, tls: SSLContext, max_pending: int
    ) -> None:
        self._tls = tls
        self._identity = identity
        self._host = host
        self._port = port
        self.broker = f"{host}:{port}"
        self.pending: deque[tuple[str, bytes]] = deque()
        self._max_pending = max_pending
        self._more = asyncio.Event()
        self._pending_gauge = PENDING.labels(broker=self.broker)
        self._published = PUBLISHED.labels(broker=self.broker)
        self._dropped = DROPPED.labels(broker=self.broker)
        self._client: Client | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None and bool(self._client.is_connected)

    def offer(self, items: Sequence[tuple[str, bytes]]) -> None:
        if not items:
            return
        room = max(0, self._max_pending - len(self.pending))
        self.pending.extend(items[:room])
        over = len(items) - room
        if over > 0:  # the oldest may be in flight: the newest give way
            self._dropped.inc(over)
            log.error(
                "republish_dropped", broker=self.broker, dropped=over,
                max_pending=self._max_pending,
            )  # fmt: skip
        self._pending_gauge.set(len(self.pending))
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
                log.warning("republish_broker_unreachable", broker=self.broker,
                            error=str(exc), retry_in_s=delay)  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        else:
            return
        self._client = client
        log.info("republish_connected", broker=self.broker, identity=self._identity)
        try:
            await self._drain(client, acks, stop)
        finally:
            self._client = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 5)
            log.info("republish_stopped", broker=self.broker, left_unsent=len(self.pending))

    async def _drain(self, client: Client, acks: _Acks, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not self.pending or not client.is_connected:
                self._more.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._more.wait(), 0.5)
                continue
            chunk = [self.pending[i] for i in range(min(_CHUNK, len(self.pending)))]
            acks.pushed.clear()
            acks.acked.clear()
            acks.lost = False
            try:
                for topic, body in chunk:
                    client.publish(topic, body, qos=1)
            except Exception as exc:  # noqa: BLE001 - a connection lost mid-chunk: resent
                log.warning("republish_interrupted", broker=self.broker, error=str(exc))
            mids = set(acks.pushed)
            while not (mids <= acks.acked or acks.lost) and client.is_connected:
                if stop.is_set():
                    return
                acks.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(acks.changed.wait(), 1.0)
            # all of the chunk sent and acknowledged, or all of it again (at least once)
            if len(mids) == len(chunk) and mids <= acks.acked:
                for _ in chunk:
                    self.pending.popleft()
                self._published.inc(len(chunk))
                self._pending_gauge.set(len(self.pending))
            else:
                log.warning("republish_interrupted", broker=self.broker,
                            unacknowledged=len(mids - acks.acked))  # fmt: skip
