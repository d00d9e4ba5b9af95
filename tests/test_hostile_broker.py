"""Hostile input through the real broker and a real worker: oversize packets, deep and huge
JSON, a flooding meter, 10,000 bad signatures, replays an hour later, hostile values."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import redis
from ingest_harness import (
    ProbeMeter,
    WorkerProcess,
    provision,
    running_worker,
    stored_counts,
    worker_settings,
)

from meterproof.certs.layout import PkiLayout
from meterproof.schemas.codec import encode_reading
from meterproof.schemas.reading import b64url, b64url_decode
from meterproof.schemas.timestamps import wall_ms
from meterproof.stack.broker import BrokerServer
from meterproof.stack.redis import RedisServer

#: mosquitto.conf.tmpl: max_packet_size 8192 (not message_size_limit, see its comment).
MAX_PACKET = 8192


def _rows(database_url: str, query: str, *args: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(query, args).fetchall()  # type: ignore[arg-type]


def _rejected(database_url: str, meter_id: str) -> Counter[str]:
    rows = _rows(database_url, "SELECT reason FROM rejected_readings WHERE meter_id = %s", meter_id)
    return Counter(str(r[0]) for r in rows)


def _status(database_url: str, meter_id: str) -> str:
    return str(_rows(database_url, "SELECT status FROM meters WHERE meter_id = %s", meter_id)[0][0])


def test_a_packet_over_the_broker_limit_ends_that_connection_only(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    hostile, honest = make_meter_id(), make_meter_id()
    key = provision(pki, database_url, hostile)
    honest_key = provision(pki, database_url, honest)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url
    )
    log_before = broker.files.log.stat().st_size

    async def scenario() -> tuple[bool, list[dict[str, Any]]]:
        async with running_worker(settings):
            bad = ProbeMeter(hostile, key, pki, broker.port)
            good = ProbeMeter(honest, honest_key, pki, broker.port)
            await bad.connect()
            await good.connect()
            bad.publish(b"{" + b" " * MAX_PACKET + b"}")
            for _ in range(50):
                if not bad.connected:
                    break
                await asyncio.sleep(0.1)
            still_connected = bad.connected
            with contextlib.suppress(Exception):  # stop its reconnect attempts
                await bad.close()
            good.publish(good.reading(1, imp=1, exp=1))
            receipts = await good.wait_receipts(1)
            await good.close()
            return still_connected, receipts

    still_connected, receipts = asyncio.run(scenario())
    assert not still_connected, "the broker must drop a client that sends an oversize packet"
    log = broker.files.log.read_bytes()[log_before:].decode(errors="replace")
    dropped = [line for line in log.splitlines() if "disconnected due to oversize packet" in line]
    assert len(dropped) == 1, log[-2000:]
    assert hostile in dropped[0]
    assert receipts[0]["status"] == "accepted", "the worker is unaffected"
    assert _rejected(database_url, hostile) == Counter(), "nothing of it reached a worker"
    assert stored_counts(database_url, [hostile, honest]) == {(honest, 1): 1}


def test_deep_and_huge_json_under_the_packet_limit_is_malformed(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    meter_id: str,
) -> None:
    key = provision(pki, database_url, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url
    )
    payloads = [
        b"[" * 2_000 + b"]" * 2_000,  # deeper than any parser's recursion limit
        b'{"a":' * 800 + b"1" + b"}" * 800,
        b'{"v":1,"meter_id":"' + b"A" * 7_000 + b'"}',  # over 4096, under the packet limit
        b"[" + b"1," * 3_500 + b"1]",
        b" " * 8_000,
    ]

    async def scenario() -> list[dict[str, Any]]:
        async with running_worker(settings):
            meter = ProbeMeter(meter_id, key, pki, broker.port)
            await meter.connect()
            for p in payloads:
                meter.publish(p)
            meter.publish(meter.reading(1, imp=1, exp=1))
            receipts = await meter.wait_receipts(len(payloads) + 1)
            await meter.close()
            return receipts

    receipts = asyncio.run(scenario())
    assert [(r["status"], r["reason"]) for r in receipts[:-1]] == [("rejected", "malformed")] * len(
        payloads
    )
    assert all(r["reading_hash"] is None and r["seq"] is None for r in receipts[:-1])
    assert receipts[-1]["status"] == "accepted"
    assert _rejected(database_url, meter_id) == Counter({"malformed": len(payloads)})
    stored = _rows(
        database_url, "SELECT payload FROM rejected_readings WHERE meter_id = %s", meter_id
    )
    assert sorted(bytes(r[0]) for r in stored) == sorted(payloads), "raw bytes kept as received"


def test_a_flooding_meter_is_rate_limited_then_quarantined(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    meter_id: str,
) -> None:
    """docs/spec/reading-v1.md rule 9 stops the flood; QuarantinePolicy counts `rate_limited` as a
    security failure, so `quarantine_failures` of them within the window quarantine it."""
    key = provision(pki, database_url, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url,
        rate_max_readings=20, rate_window_s=60, quarantine_failures=5,
    )  # fmt: skip
    t0 = wall_ms() - 120_000
    flood = 200

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with running_worker(settings):
            meter = ProbeMeter(meter_id, key, pki, broker.port)
            await meter.connect()
            for seq in range(1, flood + 1):  # 200 readings in 20 s of meter time
                meter.publish(meter.reading(seq, ts=t0 + seq * 100, imp=seq, exp=0))
            first = list(await meter.wait_receipts(flood, within_s=30))
            for seq in range(flood + 1, flood + 6):  # meter time moved on: no longer a flood
                meter.publish(meter.reading(seq, ts=t0 + 100_000 + seq, imp=seq, exp=0))
            later = (await meter.wait_receipts(flood + 5))[flood:]
            await meter.close()
            return first, later

    first, later = asyncio.run(scenario())
    outcomes = Counter(r["reason"] or r["status"] for r in first)
    assert outcomes["accepted"] == 20
    assert outcomes["rate_limited"] >= 5
    assert set(outcomes) <= {"accepted", "rate_limited", "meter_not_active"}
    assert [r["reason"] for r in later] == ["meter_not_active"] * 5, "quarantined"
    assert _status(database_url, meter_id) == "quarantined"
    events = _rows(
        database_url,
        "SELECT count(*) FROM security_events WHERE meter_id = %s AND type = 'quarantined'",
        meter_id,
    )
    assert events[0][0] == 1
    assert len(stored_counts(database_url, [meter_id])) == 20


@pytest.mark.slow
def test_ten_thousand_bad_signatures_from_one_meter(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
    tmp_path: Path,
) -> None:
    """The real `meterproof ingest` process: every reading rejected and receipted, the
    meter quarantined after `quarantine_failures`, nothing stored, the worker's RSS bounded."""
    meter_id, forger = make_meter_id(), make_meter_id()
    provision(pki, database_url, meter_id)
    wrong_key = provision(pki, None, forger)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    count = 10_000
    t0 = wall_ms() - count * 1_000
    meter = ProbeMeter(meter_id, wrong_key, pki, broker.port)
    forged = [
        encode_reading(meter.reading(seq, ts=t0 + seq * 1_000, imp=seq, exp=0))
        for seq in range(1, count + 1)
    ]
    worker.start()
    try:
        assert worker.proc is not None
        process = psutil.Process(worker.proc.pid)
        rss: list[int] = [process.memory_info().rss]

        async def scenario() -> list[dict[str, Any]]:
            await meter.connect()
            for i, payload in enumerate(forged, 1):
                meter.publish(payload)
                if i % 1_000 == 0:
                    await asyncio.sleep(0.05)
                    rss.append(process.memory_info().rss)
            receipts = await meter.wait_receipts(count, within_s=90)
            rss.append(process.memory_info().rss)
            await meter.close()
            return receipts

        receipts = asyncio.run(scenario())
    finally:
        assert worker.stop() == 0
    reasons = Counter(r["reason"] for r in receipts)
    assert all(r["status"] == "rejected" for r in receipts)
    assert set(reasons) <= {"bad_signature", "meter_not_active"}
    assert reasons["bad_signature"] >= 5
    assert sum(reasons.values()) == count
    assert _status(database_url, meter_id) == "quarantined"
    assert sum(_rejected(database_url, meter_id).values()) == count
    assert stored_counts(database_url, [meter_id]) == {}
    growth = max(rss) - rss[0]
    assert growth < 150 * 1024 * 1024, f"worker RSS grew {growth / 2**20:.0f} MiB: {rss}"


@pytest.mark.slow
def test_a_replay_an_hour_later_is_a_duplicate_judged_by_the_database(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    meter_id: str,
) -> None:
    """The Redis fast path has forgotten the reading by then (its TTL is 1 s here);
    reading_log still knows it, so the captured bytes are a duplicate, stored once, and the
    same seq with other registers is seq_reused."""
    key = provision(pki, database_url, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url,
        replay_ttl_s=1,
    )  # fmt: skip
    now = wall_ms()
    meter = ProbeMeter(meter_id, key, pki, broker.port)
    captured = encode_reading(meter.reading(7, ts=now - 1_000, imp=500, exp=20))
    forged = encode_reading(meter.reading(7, ts=now - 1_000, imp=900, exp=20))
    cache = redis.Redis.from_url(redis_server.url)

    async def scenario() -> tuple[list[dict[str, Any]], int]:
        async with running_worker(settings):
            await meter.connect()
            meter.publish(captured)
            await meter.wait_receipts(1)
        await asyncio.sleep(1.5)
        remembered = int(cache.exists(f"mp:seen:{meter_id}:7"))
        async with running_worker(settings, clock=lambda: wall_ms() + 3_600_000):
            meter.publish(captured)
            meter.publish(forged)
            receipts = await meter.wait_receipts(3)
        await meter.close()
        return receipts, remembered

    receipts, remembered = asyncio.run(scenario())
    cache.close()
    assert remembered == 0, "the replay cache must have expired for this test to mean anything"
    assert [(r["status"], r["reason"]) for r in receipts] == [
        ("accepted", None),
        ("duplicate", None),
        ("rejected", "seq_reused"),
    ]
    assert receipts[0]["reading_hash"] == receipts[1]["reading_hash"]
    assert stored_counts(database_url, [meter_id]) == {(meter_id, 7): 1}


HOSTILE_VALUES = [
    "'; DROP TABLE readings; --",
    "x' OR '1'='1",
    "../../../../etc/passwd",
    "..",
    "a\nb\rc\td",
    "\x1b[2J\x07",
    "\u202eevil",
    "%s%n{0}${jndi:x}",
    "A" * 3_000,
]


def _canonical_sig(value: str) -> bool:
    if not re.fullmatch(r"[A-Za-z0-9_-]{2,}", value) or len(value) % 4 == 1:
        return False
    return b64url(b64url_decode(value)) == value


def test_hostile_values_in_payloads_are_rejected_with_a_spec_code(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    meter_id: str,
) -> None:
    key = provision(pki, database_url, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url,
        quarantine_failures=1_000,
    )  # fmt: skip
    meter = ProbeMeter(meter_id, key, pki, broker.port)
    base = meter.reading(1, imp=1, exp=1).wire_dict()
    cases: list[tuple[bytes, str]] = []
    for value in HOSTILE_VALUES:
        id_reason = (
            "topic_mismatch" if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value) else "malformed"
        )
        cases.append((json.dumps({**base, "meter_id": value}).encode(), id_reason))
        cases.append((json.dumps({**base, value: 1}).encode(), "malformed"))
        # any alg names no key, and so does an empty kid (the shared contract, rule 4)
        cases.append((json.dumps({**base, "alg": value}).encode(), "unsupported_alg"))
        kid_reason = "unsupported_alg" if len(value) <= 64 else "malformed"
        cases.append((json.dumps({**base, "kid": value}).encode(), kid_reason))
        sig_reason = "bad_signature" if _canonical_sig(value) else "malformed"
        cases.append((json.dumps({**base, "sig": value}).encode(), sig_reason))
    cases.append((b'{"meter_id":"' + b"B" * 6_000 + b'"}', "malformed"))
    meters_before = _rows(database_url, "SELECT count(*) FROM meters")[0][0]

    async def scenario() -> list[dict[str, Any]]:
        async with running_worker(settings):
            await meter.connect()
            for payload, _ in cases:
                meter.publish(payload)
            meter.publish(meter.reading(2, imp=2, exp=2))
            receipts = await meter.wait_receipts(len(cases) + 1, within_s=30)
            await meter.close()
            return receipts

    receipts = asyncio.run(scenario())
    got = [r["reason"] for r in receipts[:-1]]
    assert got == [reason for _, reason in cases]
    assert receipts[-1]["status"] == "accepted", "the worker is unaffected"
    assert stored_counts(database_url, [meter_id]) == {(meter_id, 2): 1}
    assert _rows(database_url, "SELECT count(*) FROM meters")[0][0] == meters_before
    assert sum(_rejected(database_url, meter_id).values()) == len(cases)


def test_a_nul_in_an_unknown_key_does_not_block_the_worker(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    meter_id: str,
) -> None:
    key = provision(pki, database_url, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url,
        retry_max_s=0.5,
    )  # fmt: skip
    meter = ProbeMeter(meter_id, key, pki, broker.port)
    poison = encode_reading(meter.reading(1, imp=1, exp=1))[:-1] + b',"\\u0000":1}'

    async def scenario() -> list[dict[str, Any]]:
        async with running_worker(settings):
            await meter.connect()
            meter.publish(poison)
            meter.publish(meter.reading(2, imp=2, exp=2))
            try:
                return await meter.wait_receipts(2, within_s=8)
            finally:
                await meter.close()

    started = time.monotonic()
    receipts = asyncio.run(scenario())
    assert time.monotonic() - started < 30
    assert [r["reason"] for r in receipts] == ["malformed", None]
