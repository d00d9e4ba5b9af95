"""The MQTT source against brokers that fail in ways Mosquitto does not: a plain TLS server
that completes the handshake and then never answers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest
from ingest_harness import worker_settings
from structlog.testing import capture_logs
from waiting import async_wait_until

from meterproof.certs.layout import PkiLayout
from meterproof.ingest import source as source_module
from meterproof.ingest.source import BrokerSet, mqtt_source
from meterproof.stack.broker import BrokerServer
from meterproof.stack.process import LOOPBACK


@contextlib.contextmanager
def _tls_server_that_never_answers(pki: PkiLayout) -> Iterator[int]:
    """A port whose server completes TLS with the broker's certificate, then reads and
    writes nothing: no CONNACK, and no answer to the client's close_notify either."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    links: list[socket.socket] = []
    with socket.create_server((LOOPBACK, 0)) as server:
        server.settimeout(30)

        def accept() -> None:
            with contextlib.suppress(OSError):
                link, _ = server.accept()
                links.append(context.wrap_socket(link, server_side=True))

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            yield server.getsockname()[1]
        finally:
            server.close()
            thread.join(30)
            for link in links:
                link.close()


def test_stopping_a_connection_the_broker_never_answers_is_prompt(pki: PkiLayout) -> None:
    """A broker that finishes TLS but never sends a CONNACK: the start is given up (as a
    stopping worker does, `Worker._unless_stopping`) and the stop that follows returns at
    once. It waited for the broker's answer to the TLS close_notify: asyncio's 30 s."""
    with _tls_server_that_never_answers(pki) as port:
        settings = worker_settings(
            pki=pki, port=port, database_url="postgresql://unused", redis_url=None,
            identity="ingest-0",
        )  # fmt: skip

        async def scenario() -> float:
            source = mqtt_source(settings)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(source.start(lambda _: None), 2)
            started = time.monotonic()
            await asyncio.wait_for(source.stop(), 60)
            return time.monotonic() - started

        took = asyncio.run(scenario())
    assert took < 5, took


@pytest.mark.slow
def test_a_broker_of_several_that_never_answers_does_not_hold_up_the_others(
    pki: PkiLayout, broker: BrokerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One broker of two finishes TLS and never sends a CONNACK: the start returns once the
    other accepts and this one's CONNACK is overdue, and it is tried again in the
    background. The start waited for that CONNACK for ever, so the worker never took a
    batch from the broker that worked. (The 20 s bound shortened to 2 s here.)"""
    monkeypatch.setattr(source_module, "_CONNECT_S", 2.0)
    with _tls_server_that_never_answers(pki) as silent:
        settings = worker_settings(
            pki=pki, port=broker.port, database_url="postgresql://unused", redis_url=None,
            mqtt_brokers=f"{LOOPBACK}:{broker.port},{LOOPBACK}:{silent}",
        )  # fmt: skip

        async def scenario() -> float:
            source = mqtt_source(settings)
            assert isinstance(source, BrokerSet)
            began = time.monotonic()
            try:
                await asyncio.wait_for(source.start(lambda _: None), 60)
                took = time.monotonic() - began
                await async_wait_until(lambda: source.connected, what="the first broker")
            finally:
                await source.stop()
            return took

        with capture_logs() as logs:
            took = asyncio.run(scenario())
    assert took < 10, took  # the CONNACK overdue after 2 s
    (late,) = [e for e in logs if e["event"] == "broker_unreachable_at_start"]
    assert late["broker"] == 1
