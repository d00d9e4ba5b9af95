"""Building blocks for end-to-end ingest tests: provisioned meters that publish and collect
receipts over mutual TLS, and a worker running in the test's event loop or as a process.

The broker makes a certificate's CN its client id, so a certificate is one connection and
one session: every worker gets an ingest identity of its own (`fresh_ingest_identity`)
and a secret share group, as in production."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import paho.mqtt.client as mqtt
import psycopg
from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv50
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from waiting import async_wait_until, wait_until

from meterproof.certs import issue_device
from meterproof.certs.identities import INGEST_IDENTITY_RE, ingest_instance
from meterproof.certs.layout import IdentityFiles, PkiLayout
from meterproof.certs.tls import client_context
from meterproof.config import new_share_group
from meterproof.ingest.settings import IngestSettings
from meterproof.ingest.source import Delivery, Handler, Source, mqtt_source
from meterproof.ingest.worker import Worker, postgres_store
from meterproof.registry import repository
from meterproof.registry.model import MeterStatus, NewKey, NewMeter
from meterproof.schemas.codec import encode_reading, sign_reading
from meterproof.schemas.reading import SignedReading
from meterproof.schemas.signatures import PrivateKey, load_private_key
from meterproof.schemas.timestamps import wall_ms

_identity_turn = itertools.count()


def provision(
    pki: PkiLayout,
    database_url: str | None,
    meter_id: str,
    *,
    status: MeterStatus = MeterStatus.ACTIVE,
    public_key_pem: str | None = None,
    alg: str = "EdDSA",
) -> PrivateKey:
    """Issue the meter's certificate and signing key; register it unless database_url is None."""
    files = pki.device(meter_id)
    if not files.cert.exists():
        issue_device(pki, meter_id, alg=alg)
    key = load_private_key(alg, files.signing_key.read_bytes())
    if database_url is not None:
        pem = public_key_pem or files.signing_pub.read_text()
        with psycopg.connect(database_url, autocommit=True) as conn:
            repository.register(conn, [NewMeter(meter_id, NewKey.parse(alg, pem), status=status)])
    return key


def tls_context(pki: PkiLayout, cert: Path, key: Path) -> ssl.SSLContext:
    """A test client's mutual TLS to the session broker, as every client of ours builds it."""
    return client_context(cert=cert, key=key, ca_cert=pki.ca_cert)


@dataclass
class ProbeMeter:
    """A meter as a test needs it: publishes QoS 1 on its topic, collects its receipts."""

    meter_id: str
    key: PrivateKey | None
    pki: PkiLayout
    port: int
    receipts: list[dict[str, Any]] = field(default_factory=list)
    _client: Client | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    async def connect(self) -> None:
        files = self.pki.device(self.meter_id)
        client = Client(self.meter_id, clean_session=False, session_expiry_interval=300)
        # Another connection with this meter's certificate (puback_reason) takes the
        # session over; come back soon and subscribe again, in case the session went.
        client.set_config({"reconnect_retries": -1, "reconnect_delay": 1})
        client.on_message = self._on_message
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        ctx = tls_context(self.pki, files.cert, files.key)
        await client.connect("127.0.0.1", self.port, ssl=ctx, version=MQTTv50)
        self._client = client
        # Subscribed before the first receipt can be published.
        await asyncio.wait_for(self._subscribed.wait(), 10)

    def _on_connect(self, client: Client, flags: int, rc: int, properties: Any) -> None:
        client.subscribe(f"meters/{self.meter_id}/receipts", qos=1)

    def _on_subscribe(self, client: Client, mid: int, granted: Any, properties: Any) -> None:
        self._subscribed.set()

    @property
    def connected(self) -> bool:
        return self._client is not None and bool(self._client.is_connected)

    def _on_message(self, client: Client, topic: str, payload: bytes, qos: int, props: Any) -> int:
        self.receipts.append(orjson.loads(payload))
        self._arrived.set()
        return 0

    def reading(
        self, seq: int, *, ts: int | None = None, imp: int = 0, exp: int = 0
    ) -> SignedReading:
        assert self.key is not None
        fields = {"meter_id": self.meter_id, "seq": seq, "ts": ts or wall_ms(),
                  "import_wh": imp, "export_wh": exp}  # fmt: skip
        return sign_reading(fields, self.key)

    def publish(self, payload: bytes | SignedReading, *, topic: str | None = None) -> None:
        assert self._client is not None
        body = encode_reading(payload) if isinstance(payload, SignedReading) else payload
        self._client.publish(topic or f"meters/{self.meter_id}/readings", body, qos=1)

    async def wait_receipts(self, count: int, within_s: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within_s
        while len(self.receipts) < count:
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.meter_id}: {len(self.receipts)} of {count} receipts")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return self.receipts

    async def close(self) -> None:
        """As the worker's own link does (ingest/source.py): a TLS shutdown that meets a
        receipt the broker was still sending raises, after the DISCONNECT went out."""
        if self._client is not None:
            with contextlib.suppress(OSError):
                await self._client.disconnect(session_expiry_interval=0)


def puback_reason(pki: PkiLayout, meter_id: str, port: int, topic: str, payload: bytes) -> int:
    """Publish once at QoS 1 as `meter_id` and return the broker's PUBACK reason code
    (paho reports it; gmqtt does not).

    One connection per certificate: a ProbeMeter of the same meter is disconnected and
    comes back within a second. Its session is kept (clean start off, an expiry), so
    receipts published meanwhile wait for it.
    """
    files = pki.device(meter_id)
    done = threading.Event()
    codes: list[int] = []
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )  # fmt: skip
    client.tls_set_context(tls_context(pki, files.cert, files.key))

    def on_publish(c: mqtt.Client, userdata: object, mid: int, rc: Any, props: Any) -> None:
        codes.append(int(rc.value))
        done.set()

    client.on_publish = on_publish
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 300
    client.connect("127.0.0.1", port, clean_start=False, properties=properties)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1)
        if not done.wait(5):
            raise TimeoutError("no PUBACK")
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0]


def end_session(pki: PkiLayout, identity: IdentityFiles, port: int) -> None:
    """Connect with clean start and no expiry, then leave: the broker drops whatever
    session (subscriptions, queued messages) an earlier test left under this identity,
    and any connection still holding it."""
    connected = threading.Event()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=identity.directory.name, protocol=mqtt.MQTTv5
    )
    client.tls_set_context(tls_context(pki, identity.cert, identity.key))
    client.on_connect = lambda *_: connected.set()
    client.connect("127.0.0.1", port, clean_start=True)
    client.loop_start()
    try:
        if not connected.wait(5):
            raise TimeoutError(f"{identity.directory.name}: no CONNACK")
    finally:
        client.disconnect()
        client.loop_stop()


def fresh_ingest_identity(pki: PkiLayout, port: int) -> str:
    """The next of the PKI's ingest worker identities in turn, its broker session ended.

    The session PKI has a pool of them (tests/fixtures/servers.py), enough for the workers
    one test runs at once.
    """
    names = sorted(
        (p.name for p in pki.services_dir.iterdir() if INGEST_IDENTITY_RE.fullmatch(p.name)),
        key=ingest_instance,
    )
    name = names[next(_identity_turn) % len(names)]
    end_session(pki, pki.service(name), port)
    return name


def worker_settings(
    *, pki: PkiLayout, port: int, database_url: str, redis_url: str | None, **overrides: Any
) -> IngestSettings:
    """A worker with an ingest identity of its own (its session ended first) and a new
    secret share group, its session expiring soon after the test. For a second worker on
    the same subscription: `worker_settings(..., share_group=first.share_group)`."""
    values: dict[str, Any] = {
        "mqtt_port": port,
        "pki_root": pki.root,
        "database_url": database_url,
        "redis_url": redis_url,
        "share_group": new_share_group(),
        "session_expiry_s": 60,
        "metrics_port": 0,
        "batch_linger_ms": 10,
        **overrides,
    }
    if "identity" not in overrides:
        values["identity"] = fresh_ingest_identity(pki, port)
    return IngestSettings.model_validate(values)


class _Proxy(abc.ABC):
    """A TCP proxy on a free loopback port in front of the PostgreSQL on `port`."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._writers: list[asyncio.StreamWriter] = []
        #: Each link a proxy may hold back, open while set; all opened before closing.
        self._gates: list[asyncio.Event] = []

    @contextlib.asynccontextmanager
    async def serving(self, database_url: str) -> AsyncIterator[str]:
        """`database_url` through the proxy (without TLS: it reads the protocol), while it
        serves; every link closed after."""
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = int(server.sockets[0].getsockname()[1])
        try:
            yield database_url.replace(f":{self._port}/", f":{port}/") + "?sslmode=disable"
        finally:
            server.close()
            for gate in self._gates:
                gate.set()
            for writer in self._writers:
                writer.close()
            await server.wait_closed()

    @abc.abstractmethod
    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        """One client's link: what the proxy does with it is what it is for."""


class CommitCutter(_Proxy):
    """Armed, it cuts the store's connection at its next COMMIT: passed on, once
    `committed()` says the server has it, with the answer held back (a reply lost to the
    network or a failover); or held back itself."""

    def __init__(self, port: int, committed: Callable[[], bool], *, deliver: bool) -> None:
        super().__init__(port)
        self._committed = committed
        self._deliver = deliver
        self.armed = False
        self.cuts = 0

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        upstream, to_server = await asyncio.open_connection("127.0.0.1", self._port)
        self._writers += [to_client, to_server]
        cut = asyncio.Event()

        async def answers() -> None:
            while data := await upstream.read(65536):
                if cut.is_set():
                    return
                to_client.write(data)

        relay = asyncio.create_task(answers())
        store = False  # only the store's connection: its startup names STORE_OPTIONS
        with contextlib.suppress(OSError):
            while data := await client.read(65536):
                store = store or b"plan_cache_mode" in data
                if store and self.armed and b"COMMIT\x00" in data:
                    self.armed = False
                    cut.set()
                    if self._deliver:
                        to_server.write(data)
                        await async_wait_until(
                            lambda: asyncio.to_thread(self._committed), what="committed"
                        )
                    self.cuts += 1
                    break
                to_server.write(data)
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
        to_client.close()
        to_server.close()


class SilentProxy(_Proxy):
    """`silence()` stops every link open now in both directions and keeps it open, as a
    host lost without a reset (a paused VM, a partition) or a stalled server does: what is
    sent is taken by the kernel and never answered. Links opened after it relay again (a
    failover's new primary), unless `new_links` too: a server that accepts connections and
    never answers their startup."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self._new_links_silent = False

    def silence(self, *, new_links: bool = False) -> None:
        self._new_links_silent = new_links
        for gate in self._gates:
            gate.clear()

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        upstream, to_server = await asyncio.open_connection("127.0.0.1", self._port)
        open_ = asyncio.Event()
        if not self._new_links_silent:
            open_.set()
        self._gates.append(open_)
        self._writers += [to_client, to_server]

        async def relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    await open_.wait()
                    if sink.is_closing():
                        return
                    sink.write(data)
            sink.close()

        await asyncio.gather(relay(client, to_server), relay(upstream, to_client))


class PassThroughSource:
    """The real MQTT source with every call passed on: a test's source overrides only what
    it changes (what the worker announces, what it acknowledges)."""

    def __init__(self, settings: IngestSettings) -> None:
        self._real = mqtt_source(settings)

    @property
    def connected(self) -> bool:
        return self._real.connected

    @property
    def refused(self) -> int | None:
        return self._real.refused

    def subscribe(self, on: bool) -> None:
        self._real.subscribe(on)

    async def start(self, deliver: Handler) -> None:
        await self._real.start(deliver)

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        return self._real.ack(deliveries)

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        await self._real.publish_many(items)

    async def stop(self) -> None:
        await self._real.stop()


@contextlib.asynccontextmanager
async def running_worker(
    settings: IngestSettings,
    *,
    clock: Callable[[], int] = wall_ms,
    source: Source | None = None,
) -> AsyncIterator[Worker]:
    """A worker in this event loop, ready (subscribed, listening to the registry); its
    source is the real MQTT one unless the test gives another."""
    worker = Worker(
        settings,
        source=source or mqtt_source(settings),
        store_factory=postgres_store(settings),
        clock=clock,
    )
    task = asyncio.create_task(worker.run())
    await async_wait_until(lambda: task.done() or worker.ready(), what="worker ready")
    if task.done():
        task.result()  # the worker failed to start: raise its error here
        raise RuntimeError(f"the worker ended at start, exit code {worker.exit_code}")
    try:
        yield worker
    finally:
        worker.stopping.set()
        await asyncio.wait_for(task, 20)


@dataclass
class WorkerProcess:
    """The real command, as an operator starts it, configured through METERPROOF_* only;
    its JSON log goes to a file (a pipe nobody reads would block the worker)."""

    settings: IngestSettings
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Launch, and wait until the worker is subscribed."""
        self.wait_for("broker_subscribed", self.launch())

    def launch(self) -> int:
        """Start the process; returns the log offset its lines begin at."""
        env = {**os.environ}
        for name, value in self.settings.model_dump(mode="json").items():
            env[f"METERPROOF_{name.upper()}"] = "" if value is None else str(value)
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "meterproof", "ingest"],
                env=env,
                stdout=sink,
                stderr=sink,
            )
        return offset

    def wait_for(self, event: str, offset: int) -> None:
        proc = self.proc
        assert proc is not None
        wait_until(
            lambda: event.encode() in self.log.read_bytes()[offset:] or proc.poll() is not None,
            what=f"worker logs {event}",
        )
        if event.encode() not in self.log.read_bytes()[offset:]:
            raise RuntimeError(f"worker exited before {event}: {self.log.read_text()[-2000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def stored_counts(database_url: str, meter_ids: list[str]) -> dict[tuple[str, int], int]:
    """(meter_id, seq) -> how many rows `readings` holds for it."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT meter_id, seq, count(*) FROM readings WHERE meter_id = ANY(%s)"
            " GROUP BY meter_id, seq",
            (meter_ids,),
        ).fetchall()
    return {(str(m), int(s)): int(n) for m, s, n in rows}


#: As the reference meter does (meter/delivery.py): a reading with no receipt this long
#: after it was sent goes out again. The broker may take a reading (PUBACK) and lose it
#: in a restart before any worker has it; only the meter's republish brings it home.
REPUBLISH_AFTER_S = 5.0


#: A probe meter that cannot reconnect for this long fails the test instead of hanging it.
OFFLINE_LIMIT_S: Final = 60.0


async def stream_readings(
    meters: list[ProbeMeter], count: int, interval_s: float, t0: int
) -> dict[tuple[str, int], SignedReading]:
    """What a meter does: one reading after another; while offline it waits (buffers).
    Returns what was sent, for `until_stored` to republish."""
    sent: dict[tuple[str, int], SignedReading] = {}
    for seq in range(1, count + 1):
        for m in meters:
            offline_since = time.monotonic()
            while not m.connected:  # gmqtt offers a flag, not an event
                if time.monotonic() - offline_since > OFFLINE_LIMIT_S:
                    raise AssertionError(f"{m.meter_id} offline for {OFFLINE_LIMIT_S} s")
                await asyncio.sleep(0.05)
            reading = m.reading(seq, ts=t0 + seq * 1_000, imp=seq, exp=seq // 2)
            m.publish(reading)
            sent[m.meter_id, seq] = reading
        await asyncio.sleep(interval_s)
    return sent


async def until_stored(
    database_url: str,
    meters: list[ProbeMeter],
    sent: dict[tuple[str, int], SignedReading],
    within_s: float,
) -> None:
    """Until every reading is stored, republishing the unreceipted ones as a meter does."""
    ids = [m.meter_id for m in meters]
    deadline = time.monotonic() + within_s
    republish_at = time.monotonic() + REPUBLISH_AFTER_S
    while time.monotonic() < deadline:
        counts = await asyncio.to_thread(stored_counts, database_url, ids)
        if len(counts) >= len(sent):
            return
        if time.monotonic() >= republish_at:
            for m in meters:
                receipted = {r["seq"] for r in m.receipts}
                for (meter_id, seq), reading in sent.items():
                    if meter_id == m.meter_id and seq not in receipted and m.connected:
                        m.publish(reading)
            republish_at = time.monotonic() + REPUBLISH_AFTER_S
        await asyncio.sleep(0.25)


def audit_exactly_once(database_url: str, ids: list[str], count: int) -> None:
    counts = stored_counts(database_url, ids)
    missing = {(m, s) for m in ids for s in range(1, count + 1)} - set(counts)
    assert not missing, f"lost {len(missing)} readings, e.g. {sorted(missing)[:3]}"
    twice = {k: n for k, n in counts.items() if n != 1}
    assert not twice, f"stored more than once: {twice}"
    assert len(counts) == len(ids) * count
