"""The machine's raw limits, measured in the same run as the pipeline, so every pipeline
figure can be read as a fraction of what the parts underneath it can do at all.

Each limit runs one component alone, doing the very operation the pipeline needs from it:
one core verifying signatures, the broker moving 200-byte QoS 1 messages over mutual TLS
between its own command-line clients, PostgreSQL taking the pipeline's rows by binary COPY (its
fastest way in: the ceiling for the store's one INSERT per batch),
Redis answering the replay check's own lookup + remember, pipelined per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

import psycopg

from meterproof.bench.backlog import signed_payloads
from meterproof.certs import issue_bulk
from meterproof.certs.layout import IdentityFiles, PkiLayout
from meterproof.ingest.decode import Decoded
from meterproof.ingest.pipeline import decode_all
from meterproof.ingest.records import Message
from meterproof.ingest.replay import RedisReplayCache
from meterproof.registry import repository
from meterproof.registry.model import NewKey, NewMeter
from meterproof.schemas import topics
from meterproof.schemas.reading import Alg, b64url_decode
from meterproof.schemas.signatures import PrivateKey, PublicKey, generate_private_key
from meterproof.schemas.timestamps import ms_to_dt
from meterproof.stack.process import executable

#: The rows the store writes, as binary COPY layouts (also `bench.bridge`'s).
COPY_LOG: Final = (
    "COPY reading_log (meter_id, seq, reading_hash, ts, import_wh, export_wh) "
    "FROM STDIN (FORMAT BINARY)"
)
LOG_TYPES: Final = ["text", "numeric", "bytea", "timestamptz", "numeric", "numeric"]
COPY_READINGS: Final = (
    "COPY readings (meter_id, seq, ts, import_wh, export_wh, power_w, voltage_mv, current_ma,"
    " frequency_mhz, power_factor_milli, alg, kid, sig, reading_hash, received_at, verified_at)"
    " FROM STDIN (FORMAT BINARY)"
)
READING_TYPES: Final = [
    "text", "numeric", "timestamptz", "numeric", "numeric", "int8", "int8", "int8", "int8",
    "int8", "text", "text", "bytea", "bytea", "timestamptz", "timestamptz",
]  # fmt: skip

Progress = Callable[[str], None]
PAYLOAD_BYTES: Final = 200


@contextlib.contextmanager
def one_core() -> Iterator[int]:
    """Pin this process to one CPU for the block: "per core" must mean one core."""
    before = os.sched_getaffinity(0)
    core = min(before)
    os.sched_setaffinity(0, {core})
    try:
        yield core
    finally:
        os.sched_setaffinity(0, before)


def _rate(step: Callable[[], object], seconds: float, *, chunk: int = 100) -> float:
    """Calls per second of `step`, timed in chunks until `seconds` have passed."""
    done = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(chunk):
            step()
        done += chunk
    return done / elapsed


@dataclass(frozen=True, slots=True)
class CryptoLimit:
    alg: str
    key: str
    verify_per_s: float
    sign_per_s: float


def crypto_limits(*, seconds: float = 2.0) -> list[CryptoLimit]:
    """Verify (and sign, for context) of a real signed reading's bytes, on one pinned core,
    through schemas.signatures: the same objects the worker verifies with."""
    message = signed_payloads("bench-crypto", generate_private_key(Alg.EDDSA), 1, t0_ms=0)[0]
    cases: list[tuple[Alg, str, PrivateKey]] = [
        (Alg.EDDSA, "Ed25519 (solders: ed25519-dalek)", generate_private_key(Alg.EDDSA)),
        (Alg.ES256, "ECDSA P-256", generate_private_key(Alg.ES256)),
        (Alg.RS256, "RSA-4096", generate_private_key(Alg.RS256, rsa_bits=4096)),
    ]
    results = []
    with one_core():
        for alg, name, private in cases:
            public = private.public_key()
            signature = private.sign(message)
            if not public.verify(signature, message):
                raise RuntimeError(f"{alg}: a fresh signature does not verify")
            verify_rate = _rate(partial(public.verify, signature, message), seconds)
            sign_rate = _rate(partial(private.sign, message), seconds / 2, chunk=10)
            results.append(CryptoLimit(alg.value, name, verify_rate, sign_rate))
    return results


@dataclass(frozen=True, slots=True)
class BrokerLimit:
    messages: int
    payload_bytes: int
    seconds: float
    per_s: float
    publisher: str
    subscriber: str


def _tls_args(pki: PkiLayout, identity: IdentityFiles, port: int) -> list[str]:
    return [
        "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "--cafile", str(pki.ca_cert),
        "--cert", str(identity.cert), "--key", str(identity.key),
    ]  # fmt: skip


def broker_limit(
    pki: PkiLayout,
    port: int,
    *,
    meter_id: str,
    reader: IdentityFiles,
    reader_name: str,
    messages: int,
) -> BrokerLimit:
    """`mosquitto_pub --repeat` -> `mosquitto_sub -C`, QoS 1 both ways, mutual TLS: a meter
    publishing on its own topic, a service identity reading it (what the ACL allows).
    `mosquitto_pub -l` at QoS 1 exits before everything is sent, so --repeat it is."""
    topic = f"meters/{meter_id}/readings"
    sub = subprocess.Popen(
        [executable("mosquitto_sub"), *_tls_args(pki, reader, port), "-t", topic, "-q", "1",
         "-C", str(messages), "-i", "bench-limit-sub"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # connected and subscribed: it has nothing to wait for but TLS
        if sub.poll() is not None:
            raise RuntimeError(
                f"mosquitto_sub exited early: {sub.stderr.read() if sub.stderr else b''!r}"
            )
        started = time.perf_counter()
        pub = subprocess.run(
            [executable("mosquitto_pub"), *_tls_args(pki, pki.device(meter_id), port),
             "-t", topic, "-q", "1", "-m", "x" * PAYLOAD_BYTES, "--repeat", str(messages),
             "--repeat-delay", "0", "-i", "bench-limit-pub"],
            capture_output=True, check=False, timeout=300,
        )  # fmt: skip
        if pub.returncode != 0:
            raise RuntimeError(f"mosquitto_pub failed: {pub.stderr.decode(errors='replace')}")
        sub.wait(timeout=300)
        seconds = time.perf_counter() - started
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    if sub.returncode != 0:
        raise RuntimeError(f"mosquitto_sub exited with {sub.returncode}")
    return BrokerLimit(
        messages, PAYLOAD_BYTES, seconds, messages / seconds, f"meter {meter_id}", reader_name
    )


@dataclass(frozen=True, slots=True)
class Fleet:
    """Decoded, genuinely signed readings (what the pipeline holds just before it stores)
    and each meter's public key."""

    rows: list[Decoded]
    keys: dict[str, PublicKey]


def pipeline_rows(meters: int, per_meter: int) -> Fleet:
    now_ms = int(time.time() * 1000)
    t0 = now_ms - per_meter * 5_000 - 60_000
    fleet = Fleet([], {})
    for m in range(meters):
        meter_id = f"bench-copy-{m:04d}"
        private = generate_private_key(Alg.EDDSA)
        fleet.keys[meter_id] = private.public_key()
        topic = topics.readings(meter_id)
        decoded, rejected = decode_all(
            Message(topic, payload, now_ms)
            for payload in signed_payloads(meter_id, private, per_meter, t0_ms=t0)
        )
        if rejected:
            raise RuntimeError(f"bench reading rejected: {rejected[0].reason}")
        fleet.rows.extend(decoded)
    return fleet


@dataclass(frozen=True, slots=True)
class CopyLimit:
    rows: int
    batch: int
    readings_s: float
    readings_per_s: float
    both_tables_s: float
    both_tables_per_s: float


def _copy_batches(
    conn: psycopg.Connection[tuple[Any, ...]],
    rows: Sequence[Decoded],
    *,
    batch: int,
    with_log: bool,
) -> float:
    started = time.perf_counter()
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        with conn.transaction(), conn.cursor() as cur:
            if with_log:
                with cur.copy(COPY_LOG) as copy:
                    copy.set_types(LOG_TYPES)
                    for d in chunk:
                        r = d.reading
                        copy.write_row(
                            (
                                r.meter_id,
                                r.seq,
                                d.reading_hash,
                                ms_to_dt(r.ts),
                                r.import_wh,
                                r.export_wh,
                            )
                        )
            with cur.copy(COPY_READINGS) as copy:
                copy.set_types(READING_TYPES)
                for d in chunk:
                    r = d.reading
                    received = ms_to_dt(d.message.received_at_ms)
                    copy.write_row(
                        (
                            r.meter_id, r.seq, ms_to_dt(r.ts), r.import_wh, r.export_wh,
                            r.power_w, r.voltage_mv, r.current_ma, r.frequency_mhz,
                            r.power_factor_milli, r.alg, r.kid, b64url_decode(r.sig),
                            d.reading_hash, received, received,
                        )
                    )  # fmt: skip
    return time.perf_counter() - started


def copy_limit(database_url: str, fleet: Fleet, *, batch: int = 1_000) -> CopyLimit:
    """Binary COPY, one transaction per batch of the worker's default size, fsync on, with
    the store's own column lists and types (imported, so they cannot drift apart): into
    `readings` alone (the issue's limit), and into `reading_log` + `readings`, which is
    what every accepted reading costs the pipeline."""
    rows = fleet.rows
    with psycopg.connect(database_url, autocommit=True) as conn:
        repository.register(
            conn, [NewMeter(m, NewKey.parse("EdDSA", k.pem())) for m, k in fleet.keys.items()]
        )
        conn.execute("TRUNCATE readings")
        readings_s = _copy_batches(conn, rows, batch=batch, with_log=False)
        conn.execute("TRUNCATE readings")
        both_s = _copy_batches(conn, rows, batch=batch, with_log=True)
    n = len(rows)
    return CopyLimit(n, batch, readings_s, n / readings_s, both_s, n / both_s)


@dataclass(frozen=True, slots=True)
class RedisLimit:
    readings: int
    batch: int
    seconds: float
    readings_per_s: float
    commands_per_s: float


async def _replay_round(url: str, rows: Sequence[Decoded], batch: int) -> float:
    cache = RedisReplayCache(url, ttl_s=900, marks_max=0)  # every key asked: Redis's limit
    try:
        await cache.lookup([("warm-up", 0)])
        started = time.perf_counter()
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            found = await cache.lookup([(d.reading.meter_id, d.reading.seq) for d in chunk])
            if any(v is not None for v in found):
                raise RuntimeError("replay cache hit on readings never seen")
            await cache.remember(
                [(d.reading.meter_id, d.reading.seq, d.reading_hash) for d in chunk]
            )
        return time.perf_counter() - started
    finally:
        await cache.close()


def redis_limit(redis_url: str, rows: Sequence[Decoded], *, batch: int = 1_000) -> RedisLimit:
    """ingest.replay's RedisReplayCache asked about every key, as a worker after a
    restart: per batch one round trip, the MGET of its keys with the previous batch's
    SET ... EX (one script call)."""
    seconds = asyncio.run(_replay_round(redis_url, rows, batch))
    n = len(rows)
    return RedisLimit(n, batch, seconds, n / seconds, 2 * n / seconds)


@dataclass(frozen=True, slots=True)
class Limits:
    crypto: list[CryptoLimit]
    broker: BrokerLimit
    copy: CopyLimit
    redis: RedisLimit

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_limits(
    *,
    run_dir: Path,
    reader_name: str,
    broker_messages: int,
    fleet: Fleet,
    crypto_seconds: float,
    progress: Progress,
) -> Limits:
    """Everything on a private stack (PKI, broker, PostgreSQL, Redis) in `run_dir`."""
    from meterproof.bench.stacks import up_on_free_ports
    from meterproof.stack.services import LocalStack

    progress(f"crypto: verify/s on one core, {crypto_seconds:.1f} s per algorithm")
    crypto = crypto_limits(seconds=crypto_seconds)
    for c in crypto:
        progress(f"  {c.key}: {c.verify_per_s:,.0f} verify/s, {c.sign_per_s:,.0f} sign/s")
    stack = LocalStack(run_dir=run_dir / "stack", pki_root=run_dir / "pki")
    env = up_on_free_ports(stack, ingest_workers=1)
    try:
        pki = PkiLayout(run_dir / "pki")
        issue_bulk(pki, ["bench-limit-0"])  # only its TLS certificate is used
        progress(f"broker: mosquitto_pub -> mosquitto_sub, {broker_messages:,} x QoS 1, mTLS")
        broker = broker_limit(
            pki, env.mqtt_port, meter_id="bench-limit-0", reader=pki.service(reader_name),
            reader_name=reader_name, messages=broker_messages,
        )  # fmt: skip
        progress(f"  {broker.per_s:,.0f} msg/s")
        progress(f"database: binary COPY of {len(fleet.rows):,} rows, 1,000 per transaction")
        copy = copy_limit(env.database_url, fleet)
        progress(
            f"  readings alone {copy.readings_per_s:,.0f} rows/s; "
            f"reading_log + readings {copy.both_tables_per_s:,.0f} readings/s"
        )
        progress(
            f"redis: replay lookup + remember of {len(fleet.rows):,} readings, 1,000 per batch"
        )
        redis_ = redis_limit(env.redis_url, fleet.rows)
        progress(
            f"  {redis_.readings_per_s:,.0f} readings/s ({redis_.commands_per_s:,.0f} commands/s)"
        )
    finally:
        stack.down(purge=True)
    return Limits(crypto, broker, copy, redis_)
