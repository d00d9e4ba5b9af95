"""A backlog of pre-signed readings queued in the broker for offline persistent sessions.

Meters may publish only on their own topic, so the backlog is published by many meter
identities at once (one paho client each, many in flight) and every PUBACK is awaited:
a backlog is only "queued" once the broker acknowledged all of it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv50
from paho.mqtt.enums import CallbackAPIVersion

from meterproof.certs.layout import IdentityFiles, PkiLayout
from meterproof.certs.tls import client_context
from meterproof.schemas.codec import encode_reading, sign_reading
from meterproof.schemas.signatures import PrivateKey


def signed_payloads(meter_id: str, key: PrivateKey, count: int, *, t0_ms: int) -> list[bytes]:
    """`count` readings 5 s apart in meter time, registers rising: all valid, all distinct."""
    return [
        encode_reading(
            sign_reading(
                {"meter_id": meter_id, "seq": seq, "ts": t0_ms + seq * 5_000,
                 "import_wh": 1_000 + seq * 3, "export_wh": seq},
                key,
            )
        )
        for seq in range(1, count + 1)
    ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class PublishedBacklog:
    messages: int
    seconds: float


def publish_backlog(
    pki: PkiLayout, port: int, backlogs: Mapping[str, Sequence[bytes]], *, threads: int = 16
) -> PublishedBacklog:
    """Publish every meter's payloads at QoS 1 and return once the broker acknowledged all."""

    def one_meter(meter_id: str) -> int:
        payloads = backlogs[meter_id]
        done = threading.Event()
        acked = 0
        lock = threading.Lock()

        def on_publish(c: mqtt.Client, u: object, mid: int, rc: object, p: object) -> None:
            nonlocal acked
            with lock:
                acked += 1
                if acked == len(payloads):
                    done.set()

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{meter_id}",
            protocol=mqtt.MQTTv5,
        )  # fmt: skip
        files = pki.device(meter_id)
        client.tls_set_context(client_context(cert=files.cert, key=files.key, ca_cert=pki.ca_cert))
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        client.on_publish = on_publish
        client.connect("127.0.0.1", port)
        client.loop_start()
        topic = f"meters/{meter_id}/readings"
        for payload in payloads:
            client.publish(topic, payload, qos=1)
        if not done.wait(300):
            raise TimeoutError(f"{meter_id}: {acked} of {len(payloads)} acknowledged")
        client.disconnect()
        client.loop_stop()
        return len(payloads)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        total = sum(pool.map(one_meter, backlogs))
    return PublishedBacklog(total, time.perf_counter() - started)


async def open_session(
    pki: PkiLayout, port: int, identity: IdentityFiles, *, client_id: str, topic: str
) -> None:
    """Create a persistent session subscribed to `topic`, then leave it offline, so the
    broker queues what is published meanwhile (clean start off from the first connect)."""
    client = Client(client_id, clean_session=False, session_expiry_interval=3600)
    await client.connect(
        "127.0.0.1",
        port,
        ssl=client_context(cert=identity.cert, key=identity.key, ca_cert=pki.ca_cert),
        version=MQTTv50,
    )
    client.subscribe(topic, qos=1)
    await asyncio.sleep(0.3)  # let the SUBACK arrive before leaving
    await client.disconnect()


async def count_only_drain(
    pki: PkiLayout,
    port: int,
    identity: IdentityFiles,
    *,
    client_id: str,
    expected: int,
    on_progress: Callable[[int], None] | None = None,
) -> float:
    """The raw receive limit: resume the session, count messages, acknowledge each at once
    (gmqtt's optimistic acks). Returns seconds from connect to the last message."""
    received = 0
    finished = asyncio.Event()

    def on_message(client: Client, topic: str, payload: bytes, qos: int, props: object) -> int:
        nonlocal received
        received += 1
        if on_progress is not None and received % 20_000 == 0:
            on_progress(received)
        if received >= expected:
            finished.set()
        return 0

    client = Client(client_id, clean_session=False, session_expiry_interval=3600,
                    receive_maximum=10_000)  # fmt: skip
    client.on_message = on_message
    started = time.perf_counter()
    await client.connect(
        "127.0.0.1",
        port,
        ssl=client_context(cert=identity.cert, key=identity.key, ca_cert=pki.ca_cert),
        version=MQTTv50,
    )
    await asyncio.wait_for(finished.wait(), 600)
    elapsed = time.perf_counter() - started
    await client.disconnect(session_expiry_interval=0)
    return elapsed
