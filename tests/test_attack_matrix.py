"""Attacks from docs/security.md that need the whole path to show they fail: a real broker
with the rendered config, a real worker, PostgreSQL and Redis, meters with certificates
from the operator PKI. Each test names the attack; its assertions fail if the control in
the matrix is taken away. Rows covered by unit or broker tests elsewhere are listed in the
matrix with their node ids."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import queue
import ssl
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psycopg
import pytest
import redis
from click.testing import CliRunner
from fixtures.servers import OwnBroker
from ingest_harness import (
    ProbeMeter,
    WorkerProcess,
    provision,
    running_worker,
    stored_counts,
    tls_context,
    worker_settings,
)
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from meterproof.certs.cli import certs as certs_cli
from meterproof.certs.layout import IdentityFiles, PkiLayout
from meterproof.config import StackEnv
from meterproof.ingest.settings import IngestSettings
from meterproof.schemas.codec import encode_reading, sign_reading
from meterproof.schemas.reading import SignedReading, b64url
from meterproof.schemas.signatures import PrivateKey, generate_private_key
from meterproof.schemas.signing import signing_bytes
from meterproof.schemas.timestamps import wall_ms
from meterproof.stack.broker import BrokerServer
from meterproof.stack.redis import RedisServer
from meterproof.stack.services import LocalStack, Ports

WAIT_S = 10.0
#: Share-group names a meter might try: the old default and the obvious ones.
GUESSES = ("ingest", "ingest-workers", "workers", "meterproof", "+")


def _settings(pki: PkiLayout, broker: BrokerServer, database_url: str, redis_url: str | None,
              **overrides: Any) -> IngestSettings:  # fmt: skip
    """A worker that never quarantines: each test sends several bad readings on purpose."""
    return worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_url,
        quarantine_failures=1000, **overrides,
    )  # fmt: skip


async def _one_by_one(meter: ProbeMeter, payloads: list[bytes]) -> list[tuple[str, str | None]]:
    """Publish each payload after the previous one's receipt: (status, reason) in order."""
    await meter.connect()
    try:
        for n, payload in enumerate(payloads, start=1):
            meter.publish(payload)
            await meter.wait_receipts(n)
    finally:
        await meter.close()
    return [(r["status"], r.get("reason")) for r in meter.receipts]


def _reading(meter_id: str, key: PrivateKey, seq: int, *, ts: int, imp: int = 1000,
             kid: str | None = None) -> SignedReading:  # fmt: skip
    fields = {"meter_id": meter_id, "seq": seq, "ts": ts, "import_wh": imp, "export_wh": 0}
    return sign_reading(fields, key, kid=kid)


def _with(reading: SignedReading, **changes: Any) -> bytes:
    """The reading's wire form with fields replaced or added after signing."""
    return orjson.dumps({**orjson.loads(encode_reading(reading)), **changes})


# ---------------------------------------------------------------------------------------
# Forged readings
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_reading_signed_by_a_key_it_carries_or_names_is_refused(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    """An attacker holding meter A's TLS key (not its signing key) and a registered meter B
    of their own signs A's readings with B's key, and points the worker at that key: in
    the payload (a `jwk` field), by key id (`kid` of B's key), or not at all. The worker
    trusts only keys the registry holds for the topic's meter."""
    victim, attacker = make_meter_id(), make_meter_id()
    provision(pki, database_url, victim)
    attacker_key = provision(pki, database_url, attacker)
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT k.kid FROM meter_keys k JOIN meters m ON k.meter = m.id WHERE m.meter_id = %s",
            (attacker,),
        ).fetchone()
    assert row is not None
    attacker_kid = str(row[0])
    t0 = wall_ms() - 60_000
    forged = _reading(victim, attacker_key, 1, ts=t0)
    payloads = [
        _with(forged, jwk=attacker_key.public_key().pem()),
        encode_reading(_reading(victim, attacker_key, 2, ts=t0 + 1, kid=attacker_kid)),
        encode_reading(_reading(victim, attacker_key, 3, ts=t0 + 2)),
    ]
    settings = _settings(pki, broker, database_url, redis_server.url)

    async def scenario() -> list[tuple[str, str | None]]:
        async with running_worker(settings):
            return await _one_by_one(ProbeMeter(victim, None, pki, broker.port), payloads)

    assert asyncio.run(scenario()) == [
        ("rejected", "malformed"),
        ("rejected", "unsupported_alg"),
        ("rejected", "bad_signature"),
    ]
    assert stored_counts(database_url, [victim]) == {}


def test_algorithm_confusion_is_refused(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    """Against a meter registered with an Ed25519 key: `none`; HS256 keyed with the public
    key (the classic JWT confusion); a valid ES256 signature by a key the attacker made;
    an Ed25519 signature relabelled ES256. The algorithm is the registered key's, never
    the payload's choice. The meter's own reading still passes afterwards."""
    meter_id = make_meter_id()
    key = provision(pki, database_url, meter_id)
    public_pem = pki.device(meter_id).signing_pub.read_bytes()
    t0 = wall_ms() - 60_000
    genuine = _reading(meter_id, key, 1, ts=t0)
    hs256 = hmac.new(public_pem, signing_bytes(genuine), hashlib.sha256).digest()
    es256 = _reading(meter_id, generate_private_key("ES256"), 1, ts=t0)
    payloads = [
        _with(genuine, alg="none", sig="AA"),
        _with(genuine, alg="HS256", sig=b64url(hs256)),
        encode_reading(es256),
        _with(genuine, alg="ES256"),
        encode_reading(genuine),
    ]
    settings = _settings(pki, broker, database_url, redis_server.url)

    async def scenario() -> list[tuple[str, str | None]]:
        async with running_worker(settings):
            return await _one_by_one(ProbeMeter(meter_id, None, pki, broker.port), payloads)

    assert asyncio.run(scenario()) == [("rejected", "unsupported_alg")] * 4 + [("accepted", None)]
    assert stored_counts(database_url, [meter_id]) == {(meter_id, 1): 1}


# ---------------------------------------------------------------------------------------
# Replays, reused sequence numbers, rollbacks, timestamps
# ---------------------------------------------------------------------------------------


def test_replay_after_the_cache_forgot_it_is_still_caught(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    """Later means after a worker restart with Redis emptied: the database's uniqueness is
    the final judge. The same bytes are a duplicate (stored once); the same seq with
    other content is seq_reused; a later reading with a lower register is
    register_decreased."""
    meter_id = make_meter_id()
    key = provision(pki, database_url, meter_id)
    t0 = wall_ms() - 600_000
    first = _reading(meter_id, key, 1, ts=t0, imp=5_000)
    settings = _settings(pki, broker, database_url, redis_server.url)

    async def scenario() -> list[tuple[str, str | None]]:
        async with running_worker(settings):
            accepted = await _one_by_one(
                ProbeMeter(meter_id, None, pki, broker.port), [encode_reading(first)]
            )
        with redis.Redis.from_url(redis_server.url) as cache:
            cache.flushdb()
        async with running_worker(settings):
            later = await _one_by_one(
                ProbeMeter(meter_id, None, pki, broker.port),
                [
                    encode_reading(first),
                    encode_reading(_reading(meter_id, key, 1, ts=t0, imp=5_001)),
                    encode_reading(_reading(meter_id, key, 2, ts=t0 + 5_000, imp=4_000)),
                ],
            )
        return accepted + later

    assert asyncio.run(scenario()) == [
        ("accepted", None),
        ("duplicate", None),
        ("rejected", "seq_reused"),
        ("rejected", "register_decreased"),
    ]
    assert stored_counts(database_url, [meter_id]) == {(meter_id, 1): 1}


def test_timestamps_from_the_future_or_long_ago_are_refused(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    """Against the worker's wall clock: just beyond max_future_s ahead, just beyond
    max_age_s old; a reading inside both bounds passes."""
    meter_id = make_meter_id()
    key = provision(pki, database_url, meter_id)
    settings = _settings(pki, broker, database_url, redis_server.url)
    now = wall_ms()
    payloads = [
        encode_reading(_reading(meter_id, key, 1, ts=now + (settings.max_future_s + 60) * 1000)),
        encode_reading(_reading(meter_id, key, 2, ts=now - (settings.max_age_s + 60) * 1000)),
        encode_reading(_reading(meter_id, key, 3, ts=now - 1_000)),
    ]

    async def scenario() -> list[tuple[str, str | None]]:
        async with running_worker(settings):
            return await _one_by_one(ProbeMeter(meter_id, None, pki, broker.port), payloads)

    assert asyncio.run(scenario()) == [
        ("rejected", "timestamp_skew"),
        ("rejected", "stale_reading"),
        ("accepted", None),
    ]


# ---------------------------------------------------------------------------------------
# The shared subscription (Mosquitto 2.0.11 grants every SUBSCRIBE)
# ---------------------------------------------------------------------------------------


def _intruder(pki: PkiLayout, port: int, meter_id: str) -> tuple[mqtt.Client, queue.Queue[bytes]]:
    """A meter that joins every share group it can think of for the readings filter."""
    files = pki.device(meter_id)
    got: queue.Queue[bytes] = queue.Queue()
    subscribed: queue.Queue[int] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=meter_id, protocol=mqtt.MQTTv5)
    client.tls_set_context(tls_context(pki, files.cert, files.key))
    client.on_message = lambda _c, _u, message: got.put(bytes(message.payload))
    client.on_subscribe = lambda _c, _u, mid, _rc, _p: subscribed.put(mid)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe([(f"$share/{name}/meters/+/readings", 1) for name in GUESSES])
    subscribed.get(timeout=WAIT_S)
    return client, got


def test_a_meter_guessing_the_share_group_takes_no_reading_from_the_workers(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    honest, intruder_id = make_meter_id(), make_meter_id()
    key = provision(pki, database_url, honest)
    provision(pki, database_url, intruder_id)
    settings = _settings(pki, broker, database_url, redis_server.url)
    count = 12
    t0 = wall_ms() - 600_000

    async def scenario() -> list[dict[str, Any]]:
        async with running_worker(settings):
            intruder, stolen = await asyncio.to_thread(_intruder, pki, broker.port, intruder_id)
            try:
                meter = ProbeMeter(honest, key, pki, broker.port)
                await meter.connect()
                for seq in range(1, count + 1):
                    meter.publish(meter.reading(seq, ts=t0 + seq * 5_000, imp=seq))
                receipts = await meter.wait_receipts(count, within_s=WAIT_S)
                await meter.close()
            finally:
                intruder.disconnect()
                intruder.loop_stop()
            assert stolen.empty()
            return receipts

    receipts = asyncio.run(scenario())
    assert sorted(r["seq"] for r in receipts) == list(range(1, count + 1))
    assert {r["status"] for r in receipts} == {"accepted"}
    assert len(stored_counts(database_url, [honest])) == count


@pytest.mark.slow
def test_the_share_group_is_a_generated_secret(pki: PkiLayout, tmp_path: Path) -> None:
    """No default a meter could know: the worker refuses to start without one (one-line
    error), and refuses a short or guessable one; `stack up` generates one per run dir,
    keeps it, and writes it to a stack.env only its owner can read."""
    base = {"pki_root": pki.root, "database_url": "postgresql://x@127.0.0.1/x"}
    with pytest.raises(ValidationError, match="share_group"):
        IngestSettings.model_validate(base)
    for weak in ("ingest", "g1234567", "a/b+c#d-0123456789"):
        with pytest.raises(ValidationError, match="share_group"):
            IngestSettings.model_validate({**base, "share_group": weak})

    env = {k: v for k, v in os.environ.items() if not k.startswith("METERPROOF_")}
    done = subprocess.run(
        [sys.executable, "-P", "-m", "meterproof", "ingest"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert b"share_group" in done.stderr
    assert done.stderr.count(b"\n") == 1

    groups = []
    for name in ("a", "a", "b"):
        local = LocalStack(run_dir=tmp_path / name, pki_root=pki.root)
        groups.append(local.prepare(Ports()).share_group)
        assert stat.S_IMODE(local.env_file.stat().st_mode) == 0o600
        assert StackEnv.read(local.env_file).share_group == groups[-1]
    assert groups[0] == groups[1] != groups[2]
    assert all(g is not None and len(g) >= 16 and g not in GUESSES for g in groups)


# ---------------------------------------------------------------------------------------
# Revocation through the operator's command, private keys
# ---------------------------------------------------------------------------------------


def _meter_connection(
    files: IdentityFiles, pki: PkiLayout, port: int
) -> tuple[mqtt.Client | None, queue.Queue[int]]:
    """A paho connection as the meter (None if refused) and a queue of its disconnects."""
    closed: queue.Queue[int] = queue.Queue()
    connected: queue.Queue[bool] = queue.Queue()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=files.directory.name,
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=False,
    )
    client.tls_set_context(tls_context(pki, files.cert, files.key))
    client.on_connect = lambda _c, _u, _f, rc, _p: connected.put(not rc.is_failure)
    client.on_disconnect = lambda _c, _u, _f, rc, _p: closed.put(rc.value)
    try:
        client.connect("127.0.0.1", port)
    except (ssl.SSLError, OSError):
        return None, closed
    client.loop_start()
    try:
        ok = connected.get(timeout=WAIT_S)
    except queue.Empty:
        ok = False
    if not ok:
        client.loop_stop()
        return None, closed
    return client, closed


@pytest.mark.slow
def test_certs_revoke_cuts_the_open_connection_and_refuses_the_next(
    pki: PkiLayout, own_broker: Callable[..., OwnBroker], make_meter_id: Callable[[], str]
) -> None:
    """The operator's path (`meterproof certs revoke`: CRL re-signed, SIGHUP, the
    dynamic-security kick) against a real broker of the stack's config, not a test double."""
    meter_id, bystander_id = make_meter_id(), make_meter_id()
    provision(pki, None, meter_id)
    provision(pki, None, bystander_id)
    broker = own_broker()
    port = broker.env.mqtt_port
    client, closed = _meter_connection(pki.device(meter_id), pki, port)
    bystander, bystander_closed = _meter_connection(pki.device(bystander_id), pki, port)
    assert client is not None
    assert bystander is not None
    try:
        result = CliRunner().invoke(
            certs_cli,
            ["--pki-root", str(pki.root), "revoke", meter_id,
             "--stack-env", str(broker.env.run_dir / "stack.env")],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "disconnected" in result.output
        assert closed.get(timeout=WAIT_S) == 0x98  # administrative action
        again, _ = _meter_connection(pki.device(meter_id), pki, port)
        assert again is None
        assert bystander_closed.empty()
    finally:
        client.loop_stop()
        bystander.disconnect()
        bystander.loop_stop()


def _key_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not line.startswith("-----")]


@pytest.mark.slow
def test_private_keys_never_reach_the_logs(
    tmp_path: Path,
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    """The worker command as an operator runs it, with good and bad readings: its log
    holds no key material (its TLS key, the meter's keys), and no secret file is readable
    by anyone but its owner (the PKI's keys, the broker's admin password)."""
    meter_id = make_meter_id()
    key = provision(pki, database_url, meter_id)
    settings = _settings(pki, broker, database_url, redis_server.url)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    t0 = wall_ms() - 60_000

    async def scenario() -> None:
        meter = ProbeMeter(meter_id, key, pki, broker.port)
        await meter.connect()
        meter.publish(meter.reading(1, ts=t0))
        meter.publish(b'{"not": "a reading"}')
        meter.publish(_with(meter.reading(2, ts=t0 + 5_000), sig="AAAA"))
        await meter.wait_receipts(3)
        await meter.close()

    worker.start()
    try:
        asyncio.run(scenario())
    finally:
        assert worker.stop() == 0
    log = (tmp_path / "worker.log").read_text()
    assert "batch_committed" in log
    assert "PRIVATE KEY" not in log
    secrets = [
        pki.service(settings.identity).key,
        pki.device(meter_id).key,
        pki.device(meter_id).signing_key,
    ]
    for path in secrets:
        assert not any(line in log for line in _key_lines(path)), path
    for path in [*pki.root.rglob("*.key"), broker.files.admin_password, broker.files.dynsec]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
