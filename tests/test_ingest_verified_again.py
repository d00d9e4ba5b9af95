"""A committed reading whose verified copies never went out (docs/spec/reading-v1.md
section 13, at least once): the meter's republish, judged `duplicate`, announces them.

Real Mosquitto (our ACL), PostgreSQL and Redis. The first worker commits and acknowledges
the reading, but its broker takes no more publishes: when it stops, its announcement is
given up (receipt and copies lost), as it would be lost by a kill -9 after the commit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import pytest
from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv50
from ingest_harness import (
    PassThroughSource,
    ProbeMeter,
    provision,
    running_worker,
    stored_counts,
    tls_context,
    worker_settings,
)
from structlog.testing import capture_logs
from waiting import async_wait_until

from meterproof.certs.identities import load_identity
from meterproof.certs.layout import IdentityFiles, PkiLayout
from meterproof.consent import repository as consents
from meterproof.consent.model import Scope
from meterproof.ingest import telemetry
from meterproof.ingest.settings import IngestSettings
from meterproof.schemas import topics
from meterproof.schemas.codec import encode_reading
from meterproof.stack.broker import BrokerServer
from meterproof.stack.redis import RedisServer

pytestmark = pytest.mark.slow


class Announcing(PassThroughSource):
    """The real source; records what the worker announces, or, `stalled`, takes none of
    it (a broker that stopped acknowledging publishes, the outbound window full)."""

    def __init__(self, settings: IngestSettings, *, stalled: bool) -> None:
        super().__init__(settings)
        self._stalled = stalled
        self.announced: list[tuple[str, bytes]] = []

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        if self._stalled:
            await asyncio.Event().wait()  # until the stopping worker gives it up
        self.announced += items
        await super().publish_many(items)


@dataclass
class Listener:
    """A subscriber (a service, or an integrator on its own feed) collecting payloads."""

    identity: IdentityFiles
    topic: str
    received: list[bytes] = field(default_factory=list)
    client: Client | None = None
    subscribed: bool = False

    async def connect(self, port: int, pki: PkiLayout) -> None:
        client = Client(self.identity.directory.name, clean_session=True)
        client.set_config({"reconnect_retries": 0})
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        ctx = tls_context(pki, self.identity.cert, self.identity.key)
        await client.connect("127.0.0.1", port, ssl=ctx, version=MQTTv50)
        client.subscribe(self.topic, qos=1)
        self.client = client
        # Subscribed before anything is published: "none arrives" must mean none was sent.
        await async_wait_until(lambda: self.subscribed, what=f"the SUBACK for {self.topic}")

    def _on_subscribe(self, _c: Client, _mid: int, _qos: Any, _p: Any) -> None:
        self.subscribed = True

    def _on_message(self, _c: Client, _topic: str, payload: bytes, _qos: int, _p: Any) -> int:
        self.received.append(payload)
        return 0

    async def close(self) -> None:
        if self.client is not None:
            await self.client.disconnect()


def _grant_live(database_url: str, pki: PkiLayout, integrator: str, meter_id: str) -> None:
    serial = load_identity(pki.integrator(integrator)).serial
    with psycopg.connect(database_url, autocommit=True) as conn:
        consents.add_integrator(conn, integrator, cert_serial=serial)
        request = consents.GrantRequest(
            integrator=integrator, meter_id=meter_id, account=None,
            scopes=frozenset({Scope.LIVE}), data_from=datetime(2026, 1, 1, tzinfo=UTC),
            data_to=None, expires_at=None,
        )  # fmt: skip
        consents.grant(conn, request, operator_reason="test")


def test_a_committed_reading_never_announced_is_announced_on_its_republish(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    meter_id: str,
    integrator_name: str,
) -> None:
    """Its republish, judged `duplicate` by the store and then by Redis, brings the verified
    copy each time, to the services and to the consenting integrator, before its receipt;
    a `seq_reused` reading (same seq, other values) brings none. Before, a duplicate got
    its receipt only: the reading was stored and anchored, and no subscriber saw it."""
    key = provision(pki, database_url, meter_id)
    _grant_live(database_url, pki, integrator_name, meter_id)
    first, second = (
        worker_settings(
            pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url
        )
        for _ in range(2)
    )
    again_before = telemetry.VERIFIED_AGAIN._value.get()

    async def scenario() -> tuple[ProbeMeter, Listener, Listener, Announcing, bytes]:
        meter = ProbeMeter(meter_id, key, pki, broker.port)
        services = Listener(pki.service("bridge"), topics.verified(meter_id))
        feed = Listener(
            pki.integrator(integrator_name), topics.integrator_verified(integrator_name, meter_id)
        )
        await meter.connect()
        await services.connect(broker.port, pki)
        await feed.connect(broker.port, pki)
        reading = encode_reading(meter.reading(1, imp=10, exp=1))

        async def committed() -> bool:
            counts = await asyncio.to_thread(stored_counts, database_url, [meter_id])
            return counts == {(meter_id, 1): 1}

        async with running_worker(first, source=Announcing(first, stalled=True)):
            meter.publish(reading)
            await async_wait_until(committed, what="the reading committed")
        assert meter.receipts == [], "the first worker's announcement was given up"
        assert services.received == feed.received == []

        async def republish(copies: int, receipts: int) -> None:
            """The meter's republish (the same bytes), until its receipt and copies are in."""
            meter.publish(reading)
            await meter.wait_receipts(receipts)
            await async_wait_until(
                lambda: len(services.received) == len(feed.received) == copies,
                what=f"{copies} verified copies",
            )

        announcing = Announcing(second, stalled=False)
        async with running_worker(second, source=announcing):
            await republish(1, 1)  # judged `duplicate` by the store
            await republish(2, 2)  # by Redis, which the second worker told
            meter.publish(meter.reading(1, imp=11, exp=1))  # seq_reused
            await meter.wait_receipts(3)
            await republish(3, 4)  # its copy would have come first, in publish order
        for client in (meter, services, feed):
            await client.close()
        return meter, services, feed, announcing, reading

    with capture_logs() as logs:
        meter, services, feed, announcing, reading = asyncio.run(scenario())
    assert "announcement_abandoned" in [e["event"] for e in logs]
    statuses = [(r["status"], r["reason"]) for r in meter.receipts]
    assert statuses == [("duplicate", None)] * 2 + [("rejected", "seq_reused"), ("duplicate", None)]
    assert len(services.received) == 3, "no copy of the seq_reused reading"
    assert feed.received == services.received
    digest = meter.receipts[0]["reading_hash"]
    for copy in services.received:
        fields = orjson.loads(copy)
        assert copy.startswith(reading[:-1])
        assert fields["reading_hash"] == digest
        assert fields["verified_at"] >= int(time.time() * 1000) - 60_000
    assert telemetry.VERIFIED_AGAIN._value.get() - again_before == 3
    verified, receipt = topics.verified(meter_id), topics.receipts(meter_id)
    order = [topic for topic, _ in announcing.announced if not topic.startswith("integrators/")]
    assert order == [verified, receipt, verified, receipt, receipt, verified, receipt], (
        "each copy goes out before its receipt"
    )
