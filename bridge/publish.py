"""Epoch summaries on `ledger/epochs`: QoS 1, retained, over mutual TLS as the `bridge`
service identity, on every broker (`EveryBroker`).

A summary is a notification; the ledger is the record. So anchoring never waits for the
broker: the publisher keeps only the latest summary and sends it whenever a connection is
up, including right after every (re)connect. Integrators subscribing late get the latest
retained one and read older epochs from the ledger (`meterproof ledger entries`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from meterproof.bridge.batches import Anchored
from meterproof.bridge.entry import header_json
from meterproof.bridge.mint import format_grid
from meterproof.bridge.telemetry import SUMMARIES_PUBLISHED
from meterproof.certs.layout import IdentityFiles
from meterproof.certs.tls import client_context

log = structlog.get_logger("bridge.publish")


def summary(anchored: Anchored) -> bytes:
    """The JSON payload: the header's fields plus what integrators want at a glance."""
    entry = anchored.entry
    view = {
        "v": 1,
        **header_json(entry.header),
        "epoch_end_ms": entry.header.epoch_start_ms + entry.header.epoch_ms,
        "entry_hash": entry.header.entry_hash.hex(),
        "minted_grid_units": str(entry.minted_units),
        "minted_grid": format_grid(entry.minted_units),
        "mint_count": len(entry.mints),
        "sealed_at_ms": anchored.sealed_at_ms,
        "anchored_at_ms": anchored.anchored_at_ms,
        "receipt": anchored.receipt.to_json(),
    }
    return orjson.dumps(view)


class SummaryPublisher:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        ca_cert: Path,
        identity: IdentityFiles,
        client_id: str,
        topic: str,
    ) -> None:
        context = client_context(cert=identity.cert, key=identity.key, ca_cert=ca_cert)
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self._client.tls_set_context(context)
        self._client.reconnect_delay_set(1, 30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._host, self._port, self._topic = host, port, topic
        self._lock = threading.Lock()
        self._latest: bytes | None = None
        self._connected = False
        self._latest_mid: int | None = None
        self._acked: deque[int] = deque(maxlen=64)  # PUBACKs may beat `_send` to the lock
        self._delivered = threading.Event()
        self._delivered.set()

    def start(self) -> None:
        """Connects in the background and keeps reconnecting; never blocks on the broker."""
        self._client.connect_async(self._host, self._port, keepalive=30)
        self._client.loop_start()

    def publish(self, payload: bytes) -> None:
        with self._lock:
            self._latest = payload
            self._delivered.clear()
            connected = self._connected
        if connected:
            self._send(payload)

    def close(self, *, flush_s: float = 0.0) -> bool:
        """Stop, after waiting up to `flush_s` for the broker to acknowledge the latest
        summary; True if it did (or there was none)."""
        delivered = self._delivered.wait(flush_s)
        self._client.disconnect()
        self._client.loop_stop()
        return delivered

    def _send(self, payload: bytes) -> None:
        info = self._client.publish(self._topic, payload, qos=1, retain=True)
        with self._lock:
            if payload is self._latest:
                self._latest_mid = info.mid
                if info.mid in self._acked:
                    self._delivered.set()

    def _on_connect(
        self,
        _client: mqtt.Client,
        _userdata: Any,  # noqa: ANN401 - paho's callback signature
        _flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Any,  # noqa: ANN401
    ) -> None:
        if reason_code.is_failure:
            log.warning("broker_refused", reason=str(reason_code))
            return
        with self._lock:
            self._connected = True
            latest = self._latest
        log.info("broker_connected", host=self._host, port=self._port)
        if latest is not None:
            self._send(latest)

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,  # noqa: ANN401
        _flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Any,  # noqa: ANN401
    ) -> None:
        with self._lock:
            self._connected = False
        log.info("broker_disconnected", reason=str(reason_code))

    def _on_publish(
        self,
        _client: mqtt.Client,
        _userdata: Any,  # noqa: ANN401
        mid: int,
        reason_code: ReasonCode,
        _properties: Any,  # noqa: ANN401
    ) -> None:
        if reason_code.is_failure:
            log.warning("summary_refused", reason=str(reason_code))
            return
        SUMMARIES_PUBLISHED.inc()
        with self._lock:
            self._acked.append(mid)
            if mid == self._latest_mid:
                self._delivered.set()


class EveryBroker:
    """One `SummaryPublisher` per broker of the list, each publishing every summary.

    All brokers rather than the first and the next on its loss (as meters do): the summary
    is retained, and a broker keeps its own retained message. Integrators reconnect to any
    broker, so each must hold the latest one: published on one broker only, a late
    subscriber on another would get an old summary (or none) until the bridge happened to
    move there. The cost is one idle connection per broker for the one bridge process.
    """

    def __init__(self, publishers: Sequence[SummaryPublisher]) -> None:
        if not publishers:
            raise ValueError("publishing needs at least one broker")
        self._publishers = tuple(publishers)

    @classmethod
    def of(
        cls,
        brokers: Sequence[tuple[str, int]],
        *,
        ca_cert: Path,
        identity: IdentityFiles,
        client_id: str,
        topic: str,
    ) -> EveryBroker:
        return cls(
            [
                SummaryPublisher(host=host, port=port, ca_cert=ca_cert, identity=identity,
                                 client_id=client_id, topic=topic)
                for host, port in brokers
            ]
        )  # fmt: skip

    def start(self) -> None:
        for publisher in self._publishers:
            publisher.start()

    def publish(self, payload: bytes) -> None:
        for publisher in self._publishers:
            publisher.publish(payload)

    def close(self, *, flush_s: float = 0.0) -> bool:
        """Stop them all within `flush_s`; True if every broker acknowledged the latest."""
        deadline = time.monotonic() + flush_s
        delivered = True
        for publisher in self._publishers:  # every one closed, even after a False
            left = max(0.0, deadline - time.monotonic())
            delivered = publisher.close(flush_s=left) and delivered
        return delivered
