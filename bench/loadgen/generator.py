"""One generator process: a slice of the fleet, each meter its own mutual-TLS MQTT 5
connection (client id = certificate CN, clean start) to the broker its id hashes to
(`plan.broker_index`; the only one unless the stack has several), subscribed to its
receipts.

Driven by JSON lines on stdin, answering JSON lines on stdout (see `bench.loadgen`):
readings are signed in `prepare` (before the clock starts, so signing costs nothing during
`go`), and `go` publishes them at QoS 1 paced by a token bucket, then matches each receipt
to its publish by (meter, seq) for the publish->receipt latency.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv50

from meterproof.bench.loadgen.plan import broker_index, due, reading_ts
from meterproof.certs.layout import PkiLayout
from meterproof.certs.tls import client_context
from meterproof.ingest import _gmqtt, _wire
from meterproof.schemas import topics
from meterproof.schemas.codec import encode_reading, sign_reading
from meterproof.schemas.signatures import PrivateKey, load_private_key

#: Handshakes in flight at once per process: enough to keep the broker busy, few enough
#: that a slow broker does not time out a thousand of them at once.
CONNECT_CONCURRENCY = 64
TICK_S = 0.002


@dataclass(slots=True)
class Run:
    """Per-second counters of one `go`, indexed by whole seconds since its start."""

    go: float
    published: list[int] = field(default_factory=list)
    receipted: list[int] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    latencies_ms: array[float] = field(default_factory=lambda: array("f"))
    unmatched: int = 0
    last_receipt: float = 0.0
    #: With `go(legs=True)`, each receipt's meter, seq, and send and receipt times (wall
    #: clock, ms) for `bench.loadgen.legs`.
    legs: Legs | None = None

    def bump(self, series: list[int], now: float, n: int = 1) -> None:
        second = max(0, int(now - self.go))
        while len(series) <= second:
            series.append(0)
        series[second] += n


@dataclass(slots=True)
class Legs:
    meter_ids: list[str] = field(default_factory=list)
    seqs: array[int] = field(default_factory=lambda: array("q"))
    sent_ms: array[float] = field(default_factory=lambda: array("d"))
    receipt_ms: array[float] = field(default_factory=lambda: array("d"))

    def add(self, meter_id: str, seq: int, sent_ms: float, receipt_ms: float) -> None:
        self.meter_ids.append(meter_id)
        self.seqs.append(seq)
        self.sent_ms.append(sent_ms)
        self.receipt_ms.append(receipt_ms)

    def as_json(self) -> bytes:
        return orjson.dumps(
            {
                "meter_id": self.meter_ids,
                "seq": self.seqs.tolist(),
                "sent": self.sent_ms.tolist(),
                "receipt": self.receipt_ms.tolist(),
            }
        )


class Meter:
    __slots__ = ("client", "disconnects", "key", "meter_id", "mid", "next_seq", "pending", "topic")

    def __init__(self, meter_id: str, key: PrivateKey, client: Client) -> None:
        self.meter_id = meter_id
        self.key = key
        self.client = client
        self.topic = topics.readings(meter_id).encode()
        self.next_seq = 1
        self.mid = 0
        self.pending: dict[int, float] = {}
        self.disconnects = 0

    def publish(self, payload: bytes) -> None:
        """A QoS 1 PUBLISH written as it is: gmqtt's `publish` costs several times the
        packet (properties, id bookkeeping, its resend store), and a generator that spends
        the machine's CPU leaves less for the pipeline it measures. Nothing is resent: a
        reading lost with its connection shows as unreceipted."""
        self.mid = self.mid % 0xFFFF + 1
        _gmqtt.write_raw(self.client, _wire.publish_packet(self.topic, payload, self.mid))


class Generator:
    def __init__(self, job: dict[str, Any]) -> None:
        self.pki = PkiLayout(Path(job["pki_root"]))
        #: (host, port) of every broker; each meter connects to one, by `broker_index`.
        self.brokers: list[tuple[str, int]] = [(h, p) for h, p in job["brokers"]]
        self.ts_base_ms: int = job["ts_base_ms"]
        self.out_dir = Path(job["out_dir"])
        self.name: str = job["name"]
        self.meters = [self._meter(m) for m in job["meters"]]
        self.run: Run | None = None
        self.batch: list[tuple[Meter, int, bytes]] = []
        self.rate = 0.0

    def _meter(self, meter_id: str) -> Meter:
        files = self.pki.device(meter_id)
        key = load_private_key("EdDSA", files.signing_key.read_bytes())
        meter = Meter(meter_id, key, Client(meter_id, clean_session=True))

        def on_receipt(first: int, body: bytes) -> None:
            publish = _wire.parse_publish(first, body)
            if isinstance(publish, _wire.Drop):
                return  # not from Mosquitto: its receipt stays unmatched
            if publish.packet_id is not None:
                _gmqtt.write_raw(meter.client, _wire.puback_packet(publish.packet_id))
            self._receipt(meter, publish.payload)

        def on_connect(client: Client, flags: int, rc: int, props: Any) -> None:  # noqa: ANN401
            _gmqtt.read_directly(
                client, on_publish=on_receipt, on_puback=_ignore, on_broken=_ignore_broken
            )
            client.subscribe(topics.receipts(meter_id), qos=1)

        def on_disconnect(client: Client, packet: Any, exc: Any = None) -> None:  # noqa: ANN401
            meter.disconnects += 1

        meter.client.on_connect = on_connect
        meter.client.on_disconnect = on_disconnect
        return meter

    def _context(self, meter_id: str, ca_pem: str) -> ssl.SSLContext:
        files = self.pki.device(meter_id)
        return client_context(cert=files.cert, key=files.key, ca_pem=ca_pem)

    def _receipt(self, meter: Meter, payload: bytes) -> None:
        now = time.monotonic()
        run = self.run
        if run is None:
            return
        body = orjson.loads(payload)
        seq = body.get("seq")
        sent = meter.pending.pop(seq, None)
        if sent is None:
            run.unmatched += 1  # a receipt for a redelivery already counted
            return
        latency_ms = (now - sent) * 1000
        run.latencies_ms.append(latency_ms)
        run.last_receipt = time.time()
        if run.legs is not None:
            receipt_ms = run.last_receipt * 1000
            run.legs.add(meter.meter_id, seq, receipt_ms - latency_ms, receipt_ms)
        run.bump(run.receipted, run.last_receipt)
        run.statuses[body["status"]] += 1
        if body.get("reason"):
            run.reasons[body["reason"]] += 1

    async def connect(self) -> dict[str, Any]:
        """Connect every meter; the completion times give the handshake rate. The TLS
        contexts (a key and certificate read and parsed, ~1 ms each) are built first, so
        the ramp times handshakes, not file loading."""
        began = time.time()
        ca_pem = self.pki.ca_cert.read_text(encoding="ascii")
        contexts = {m.meter_id: self._context(m.meter_id, ca_pem) for m in self.meters}
        contexts_s = time.time() - began
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        done: list[float] = []
        per_broker = [0] * len(self.brokers)
        errors: Counter[str] = Counter()

        async def one(meter: Meter) -> None:
            broker = broker_index(meter.meter_id, len(self.brokers))
            host, port = self.brokers[broker]
            async with gate:
                try:
                    await meter.client.connect(
                        host,
                        port,
                        ssl=contexts.pop(meter.meter_id),
                        version=MQTTv50,
                        keepalive=120,
                    )
                    done.append(time.time())
                    per_broker[broker] += 1
                except Exception as exc:  # noqa: BLE001 - every failure is counted by kind
                    errors[f"{type(exc).__name__}: {exc}"[:120]] += 1

        started = time.time()
        await asyncio.gather(*(one(m) for m in self.meters))
        await asyncio.sleep(0.5)  # SUBACKs of the receipts topics
        return {
            "event": "connected",
            "meters": len(self.meters),
            "connected": len(done),
            "contexts_s": contexts_s,
            "started": started,
            "finished": max(done, default=started),
            "per_second": _per_second(done, started),
            "per_broker": per_broker,
            "errors": dict(errors.most_common(5)),
        }

    def prepare(self, count: int, rate: float) -> dict[str, Any]:
        """Sign `count` readings round-robin over the meters (seq and registers rising)."""
        began = time.perf_counter()
        batch = []
        meters = [m for m in self.meters if m.client.is_connected]
        if not meters:
            disconnects = sum(m.disconnects for m in self.meters)
            raise ConnectionError(
                f"none of this generator's {len(self.meters)} meters is connected "
                f"({disconnects} disconnects since the connect): is the broker up?"
            )
        for k in range(count):
            meter = meters[k % len(meters)]
            seq = meter.next_seq
            meter.next_seq += 1
            fields = {
                "meter_id": meter.meter_id,
                "seq": seq,
                "ts": reading_ts(self.ts_base_ms, seq),
                "import_wh": 1_000 + seq * 3,
                "export_wh": seq,
            }
            batch.append((meter, seq, encode_reading(sign_reading(fields, meter.key))))
        self.batch = batch
        self.rate = rate
        return {"event": "prepared", "count": count, "sign_s": time.perf_counter() - began}

    async def go(
        self, start_at: float, grace_s: float, tag: str, *, legs: bool = False
    ) -> dict[str, Any]:
        batch, rate, total = self.batch, self.rate, len(self.batch)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        run = self.run = Run(go=time.time(), legs=Legs() if legs else None)
        cpu0 = time.process_time()
        started = time.monotonic()
        sent = 0
        while sent < total:
            n = due(time.monotonic() - started, rate, sent, total)
            now_wall, now = time.time(), time.monotonic()
            for meter, seq, payload in batch[sent : sent + n]:
                meter.pending[seq] = now
                meter.publish(payload)
            run.bump(run.published, now_wall, n)
            sent += n
            await asyncio.sleep(TICK_S)
        publish_s = time.monotonic() - started
        deadline = time.monotonic() + grace_s
        while any(m.pending for m in self.meters) and time.monotonic() < deadline:  # noqa: ASYNC110 - a poll every 50 ms costs less than an event set per receipt
            await asyncio.sleep(0.05)
        unreceipted = sum(len(m.pending) for m in self.meters)
        for meter in self.meters:
            meter.pending.clear()
        self.run, self.batch = None, []
        safe_tag = tag.replace("/", "_")
        latencies = self.out_dir / f"latency-{safe_tag}-{self.name}.f32"
        latencies.write_bytes(run.latencies_ms.tobytes())
        legs_file = None
        if run.legs is not None:
            legs_file = self.out_dir / f"legs-{safe_tag}-{self.name}.json"
            legs_file.write_bytes(run.legs.as_json())
        return {
            "event": "done",
            "published": sent,
            "go": run.go,
            "last_receipt": run.last_receipt,
            "publish_s": publish_s,
            "published_per_second": run.published,
            "receipted_per_second": run.receipted,
            "statuses": dict(run.statuses),
            "reasons": dict(run.reasons),
            "unreceipted": unreceipted,
            "unmatched": run.unmatched,
            "latencies_file": str(latencies),
            "legs_file": None if legs_file is None else str(legs_file),
            "cpu_s": time.process_time() - cpu0,
            "disconnects": sum(m.disconnects for m in self.meters),
            "connected": sum(1 for m in self.meters if m.client.is_connected),
        }

    async def close(self) -> None:
        await asyncio.gather(
            *(m.client.disconnect() for m in self.meters if m.client.is_connected),
            return_exceptions=True,
        )


def _ignore_broken(reason: _wire.Drop) -> None:
    """gmqtt closes the link; the meter reconnects and counts a disconnect."""


def _ignore(cmd: int, raw: bytes) -> None:
    """The broker's PUBACK of a reading: nothing to do, nothing is kept for resending."""


def _per_second(times: list[float], start: float) -> list[int]:
    out: list[int] = []
    for t in times:
        second = max(0, int(t - start))
        while len(out) <= second:
            out.append(0)
        out[second] += 1
    return out


def _reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def serve(job: dict[str, Any]) -> None:
    """Connect, answer, then obey commands until `stop` (or stdin closes)."""
    gen = Generator(job)
    _reply(await gen.connect())
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "prepare":
            _reply(gen.prepare(cmd["count"], cmd["rate"]))
        elif cmd["cmd"] == "go":
            _reply(
                await gen.go(
                    cmd["start_at"], cmd["grace_s"], cmd["tag"], legs=cmd.get("legs", False)
                )
            )
        elif cmd["cmd"] == "stop":
            break
    await gen.close()
    _reply({"event": "stopped"})
