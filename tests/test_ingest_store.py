"""The store asks PostgreSQL for each candidate's `StoredContext`; `ingest.judge.context_of`
computes the same from readings in memory (the judge's own tests and the fuzzer use it).
Here the two must agree, on a real database, for histories and candidates chosen to sit on
every edge the rules have: equal ts, one ms either side, the rate window's both ends, seqs
already stored, and windows fuller than the limit."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import psycopg
import pytest

from meterproof.ingest import store
from meterproof.ingest.judge import RateLimit, StoredPoint, context_of
from meterproof.ingest.records import Candidate, Message
from meterproof.ingest.security import QuarantinePolicy
from meterproof.ingest.store import STORE_OPTIONS, ReadingStore
from meterproof.registry import repository
from meterproof.registry.model import NewKey, NewMeter
from meterproof.schemas.codec import sign_reading
from meterproof.schemas.reading import I64_MIN, U64_MAX, b64url_decode
from meterproof.schemas.signatures import PrivateKey, generate_private_key
from meterproof.schemas.signing import reading_hash, signing_bytes

T0 = 1_767_225_600_000
LIMIT = RateLimit(window_ms=10_000, max_readings=4)


def candidate(key: PrivateKey, meter_id: str, seq: int, ts: int, imp: int, exp: int) -> Candidate:
    reading = sign_reading(
        {"meter_id": meter_id, "seq": seq, "ts": ts, "import_wh": imp, "export_wh": exp}, key
    )
    message = signing_bytes(reading)
    return Candidate(
        Message(f"meters/{meter_id}/readings", b"", ts), reading, message,
        reading_hash(message), ts,
    )  # fmt: skip


def probe_ts(rng: random.Random, stored: list[int]) -> int:
    """A ts on an edge of the stored ones: equal, 1 ms off, or a window's length off."""
    base = rng.choice(stored) if stored else T0
    offset = rng.choice(
        [0, 1, -1, LIMIT.window_ms, -LIMIT.window_ms, LIMIT.window_ms - 1, -LIMIT.window_ms + 1]
    )
    return base + offset if rng.random() < 0.8 else T0 + rng.randrange(-20_000, 80_000)


@pytest.mark.parametrize(
    "limit",
    [LIMIT, RateLimit(LIMIT.window_ms, 60)],
    ids=["limit-4", "limit-60-the-default"],
)
def test_database_contexts_equal_the_in_memory_ones(
    database_url: str, make_meter_id: Callable[[], str], limit: RateLimit
) -> None:
    rng = random.Random(20261123)
    key = generate_private_key("EdDSA")
    meters = [make_meter_id() for _ in range(5)]
    with psycopg.connect(database_url, autocommit=True) as conn:
        repository.register(
            conn, [NewMeter(m, NewKey.parse("EdDSA", key.public_key().pem())) for m in meters]
        )
    # Histories: distinct ts per meter (which of two equal-ts neighbours is nearer is not
    # defined), registers rising with ts, dense enough that windows overflow the limit;
    # the fourth meter's windows hold more readings than the default limit of 60.
    history: dict[str, list[StoredPoint]] = {}
    seen: dict[tuple[str, int], bytes] = {}
    stored: list[Candidate] = []
    for meter_id, span, grid, count in [
        (meters[0], 60_000, 250, 40), (meters[1], 60_000, 250, 40),
        (meters[2], 60_000, 250, 40), (meters[3], 12_000, 100, 100),
    ]:  # fmt: skip  # the fifth has nothing stored
        times = sorted(rng.sample(range(T0, T0 + span, grid), count))
        order = rng.sample(range(len(times)), len(times))  # seqs not in ts order
        for seq, i in enumerate(order, start=1):
            stored.append(candidate(key, meter_id, seq, times[i], 100 + i, 10 + i))
    for c in stored:
        r = c.reading
        history.setdefault(r.meter_id, []).append(StoredPoint(r.ts, r.import_wh, r.export_wh))
        seen[(r.meter_id, r.seq)] = c.reading_hash
    probes = []
    for _ in range(400):
        meter_id = rng.choice(meters)
        ts = probe_ts(rng, [p.ts_ms for p in history.get(meter_id, [])])
        seq = rng.randrange(1, 60)  # about two in three already stored
        probes.append(candidate(key, meter_id, seq, ts, rng.randrange(90, 160), 20))

    # the workers' session (generic plans, no sequential scans): the plans judged here
    with psycopg.connect(database_url, autocommit=True, options=STORE_OPTIONS) as conn:
        store = ReadingStore(
            conn, limit=RateLimit(10_000, 100_000), policy=QuarantinePolicy()
        )  # stores every history reading
        shuffled = rng.sample(stored, len(stored))  # in batches, out of ts order
        for begin in range(0, len(shuffled), 37):
            result = store.commit_batch(shuffled[begin : begin + 37], [])
            assert {type(o).__name__ for o in result.outcomes} == {"Accepted"}
        with conn.transaction():
            got = ReadingStore(conn, limit=limit, policy=QuarantinePolicy()).stored_contexts(probes)

    expected = context_of(probes, seen=seen, history=history, limit=limit)
    for probe, want, have in zip(probes, expected, got, strict=True):
        r = probe.reading
        assert have == want, f"{r.meter_id} seq {r.seq} ts {r.ts - T0}"
    # the edges were reached, so the comparison meant something
    assert any(c.in_window == limit.max_readings for c in expected)
    assert any(0 < c.in_window < limit.max_readings for c in expected)
    assert any(c.reading_hash is not None for c in expected)
    assert any(c.before is None for c in expected)
    assert any(c.after is None and c.before is not None for c in expected)


def test_the_store_keeps_plans_that_probe_by_index_however_empty_the_tables(
    database_url: str,
) -> None:
    """The store's connection keeps one generic plan per statement (ingest.store.STORE_OPTIONS).
    Made while `reading_log` is empty, a plainly joined plan hashed a scan of the whole table
    and cost more with every row stored; the lateral probes must reach every table by an
    index, whatever the statistics said."""
    with psycopg.connect(database_url, autocommit=True, options=STORE_OPTIONS) as conn:
        conn.execute(
            "INSERT INTO meters (meter_id, status)"
            " SELECT 'plan-' || i, 'active' FROM generate_series(1, 300) i"
        )
        conn.execute("ANALYZE meters")
        conn.execute(f"PREPARE lock_meters(text) AS {_numbered(store._LOCK)}")
        conn.execute(
            f"PREPARE context(text, text, text, int8, int8) AS {_numbered(store._CONTEXT)}"
        )
        ids = "'{plan-1,plan-2,plan-3}'"
        plans = {
            "lock": conn.execute(f"EXPLAIN EXECUTE lock_meters({ids})").fetchall(),
            "context": conn.execute(
                f"EXPLAIN EXECUTE context({ids}, '{{1,2,3}}', '{{1,2,3}}', 60000, 60)"
            ).fetchall(),
        }
    for name, rows in plans.items():
        plan = "\n".join(r[0] for r in rows)
        assert "Seq Scan" not in plan, f"{name}:\n{plan}"
        assert "Hash" not in plan, f"{name}:\n{plan}"
        assert "Index" in plan, f"{name}:\n{plan}"


def test_the_store_writes_every_column_as_given(
    database_url: str, make_meter_id: Callable[[], str]
) -> None:
    """The rows travel as one text array literal per column: quoting, NULLs, the largest
    registers and raw bytes must come back exactly as the readings had them."""
    key = generate_private_key("EdDSA")
    meter_id = make_meter_id()
    with psycopg.connect(database_url, autocommit=True) as conn:
        repository.register(
            conn, [NewMeter(meter_id, NewKey.parse("EdDSA", key.public_key().pem()))]
        )
    full = {
        "meter_id": meter_id, "seq": 1, "ts": T0, "import_wh": U64_MAX, "export_wh": 0,
        "power_w": I64_MIN, "voltage_mv": 230_000, "current_ma": -1, "frequency_mhz": 50_000,
        "power_factor_milli": 999,
    }  # fmt: skip
    bare = {"meter_id": meter_id, "seq": 2, "ts": T0 - 1000, "import_wh": 1, "export_wh": 0}
    readings = [
        sign_reading(full, key, kid='a"b\\c,{d} NULL'),
        sign_reading(bare, key),
    ]
    candidates = []
    for i, reading in enumerate(readings):
        signed = signing_bytes(reading)
        message = Message(f"meters/{meter_id}/readings", b"", T0 + 10 + i)
        candidates.append(Candidate(message, reading, signed, reading_hash(signed), T0 + 20 + i))

    with psycopg.connect(database_url, autocommit=True, options=STORE_OPTIONS) as conn:
        store = ReadingStore(conn, limit=LIMIT, policy=QuarantinePolicy())
        assert [type(o).__name__ for o in store.commit_batch(candidates, []).outcomes] == [
            "Accepted", "Accepted",
        ]  # fmt: skip
        stored = conn.execute(
            "SELECT seq, (extract(epoch FROM ts) * 1000)::int8, import_wh, export_wh, power_w,"
            " voltage_mv, current_ma, frequency_mhz, power_factor_milli, alg, kid, sig,"
            " reading_hash, (extract(epoch FROM received_at) * 1000)::int8,"
            " (extract(epoch FROM verified_at) * 1000)::int8"
            " FROM readings WHERE meter_id = %s ORDER BY seq",
            (meter_id,),
        ).fetchall()
        log = conn.execute(
            "SELECT seq, reading_hash, (extract(epoch FROM ts) * 1000)::int8, import_wh,"
            " export_wh FROM reading_log WHERE meter_id = %s ORDER BY seq",
            (meter_id,),
        ).fetchall()
    assert stored == [
        (
            r.seq, r.ts, r.import_wh, r.export_wh, r.power_w, r.voltage_mv, r.current_ma,
            r.frequency_mhz, r.power_factor_milli, r.alg, r.kid, b64url_decode(r.sig),
            c.reading_hash, c.message.received_at_ms, c.verified_at_ms,
        )
        for c in candidates
        for r in [c.reading]
    ]  # fmt: skip
    assert log == [
        (c.reading.seq, c.reading_hash, c.reading.ts, c.reading.import_wh, c.reading.export_wh)
        for c in candidates
    ]


def _numbered(query: str) -> str:
    """psycopg's placeholders as PREPARE's: `%s` in turn, `%(name)s` by first use."""
    names: list[str | None] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None or name not in names:
            names.append(name)
        return f"${len(names) if name is None else names.index(name) + 1}"

    return re.sub(r"%(?:\((\w+)\))?s", number, query)
