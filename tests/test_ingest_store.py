"""The store asks PostgreSQL for each candidate's `StoredContext`; `ingest.judge.context_of`
computes the same from readings in memory (the judge's own tests and the fuzzer use it).
Here the two must agree, on a real database, for histories and candidates chosen to sit on
every edge the rules have: equal ts, one ms either side, the rate window's both ends, seqs
already stored, and windows fuller than the limit. Then rules 3, 8 and 9 through the
store's transaction, on the edges a reading arriving out of order reaches."""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable, Sequence

import psycopg
import pytest
from waiting import wait_until

from meterproof.ingest import store
from meterproof.ingest.judge import RateLimit, StoredPoint, context_of
from meterproof.ingest.records import Accepted, Candidate, Message, Outcome, Rejection
from meterproof.ingest.security import QuarantinePolicy
from meterproof.ingest.store import STORE_OPTIONS, ReadingStore
from meterproof.registry import repository
from meterproof.registry.model import MeterStatus, NewKey, NewMeter
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
    meters = [make_meter_id() for _ in range(6)]
    with psycopg.connect(database_url, autocommit=True) as conn:
        repository.register(
            conn, [NewMeter(m, NewKey.parse("EdDSA", key.public_key().pem())) for m in meters]
        )
    # Histories: registers rising in (ts, seq) order, dense enough that windows overflow
    # the limit; the fourth meter's windows hold more readings than the default limit of
    # 60; the fifth has two or three readings at each of its ts (neighbours by seq).
    history: dict[str, list[StoredPoint]] = {}
    seen: dict[tuple[str, int], bytes] = {}
    stored: list[Candidate] = []
    for meter_id, span, grid, count in [
        (meters[0], 60_000, 250, 40), (meters[1], 60_000, 250, 40),
        (meters[2], 60_000, 250, 40), (meters[3], 12_000, 100, 100),
    ]:  # fmt: skip  # the sixth has nothing stored
        times = sorted(rng.sample(range(T0, T0 + span, grid), count))
        order = rng.sample(range(len(times)), len(times))  # seqs not in ts order
        for seq, i in enumerate(order, start=1):
            stored.append(candidate(key, meter_id, seq, times[i], 100 + i, 10 + i))
    times = sorted(rng.sample(range(T0, T0 + 60_000, 500), 15) * 3)[:40]
    for i, seq in enumerate(sorted(rng.sample(range(1, 60), len(times)))):  # seqs in ts order
        stored.append(candidate(key, meters[4], seq, times[i], 100 + i, 10 + i))
    for c in stored:
        r = c.reading
        history.setdefault(r.meter_id, []).append(
            StoredPoint(r.ts, r.import_wh, r.export_wh, r.seq)
        )
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
    # neighbours with the probe's own ts, before it and after it by seq; the stored ts
    # either side, only where readings follow within a window
    pairs = [(p.reading.ts, c) for p, c in zip(probes, expected, strict=True)]
    assert any(c.before and c.before.ts_ms == ts for ts, c in pairs)
    assert any(c.after and c.after.ts_ms == ts for ts, c in pairs)
    assert any(c.around is None for c in expected)
    assert any(c.around and c.around[-1] > ts for ts, c in pairs)


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
            f"PREPARE context(text, text, text, text, int8, int8) AS {_numbered(store._CONTEXT)}"
        )
        ids = "'{plan-1,plan-2,plan-3}'"
        plans = {
            "lock": conn.execute(f"EXPLAIN EXECUTE lock_meters({ids})").fetchall(),
            "context": conn.execute(
                f"EXPLAIN EXECUTE context({ids}, '{{1,2,3}}', '{{1,2,3}}', NULL, 60000, 60)"
            ).fetchall(),
        }
    for name, rows in plans.items():
        plan = "\n".join(r[0] for r in rows)
        assert "Seq Scan" not in plan, f"{name}:\n{plan}"
        assert "Hash" not in plan, f"{name}:\n{plan}"
        assert "Index" in plan, f"{name}:\n{plan}"
    # rule 8's neighbours in (ts, seq) order: each row comparison is where the index
    # descent starts (its Index Cond), not a filter on rows it reads
    context = "\n".join(r[0] for r in plans["context"])
    assert len(re.findall(r"Index Cond: .*ROW\(ts, ", context)) == 2, context


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


def _registered(database_url: str, make_meter_id: Callable[[], str]) -> tuple[PrivateKey, str]:
    key = generate_private_key("EdDSA")
    meter_id = make_meter_id()
    with psycopg.connect(database_url, autocommit=True) as conn:
        repository.register(
            conn, [NewMeter(meter_id, NewKey.parse("EdDSA", key.public_key().pem()))]
        )
    return key, meter_id


def _commit(database_url: str, batch: Sequence[Candidate]) -> list[str]:
    """One batch through a store of the workers' kind, with the default rate limit (60 in
    60 s); each outcome as `accepted`, `duplicate` or its reason."""
    with psycopg.connect(database_url, autocommit=True, options=STORE_OPTIONS) as conn:
        store = ReadingStore(conn, limit=RateLimit(), policy=QuarantinePolicy(failures=10**6))
        return [_named(o) for o in store.commit_batch(batch, []).outcomes]


def _named(outcome: Outcome) -> str:
    if isinstance(outcome, Rejection):
        return outcome.reason.value
    return "accepted" if isinstance(outcome, Accepted) else "duplicate"


def _stored_ts(database_url: str, meter_id: str) -> list[int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT (extract(epoch FROM ts) * 1000)::int8 FROM reading_log WHERE meter_id = %s"
            " ORDER BY ts",
            (meter_id,),
        ).fetchall()
    return [int(ts) for (ts,) in rows]


def _fullest_window(times: Sequence[int], window_ms: int) -> int:
    return max(sum(1 for t in times if s <= t < s + window_ms) for s in times)


def test_a_meter_whose_ts_goes_down_is_rate_limited_like_one_whose_ts_goes_up(
    database_url: str, make_meter_id: Callable[[], str]
) -> None:
    """Rule 9 is about every window of meter time, not only the one ending at the reading:
    100 readings 1 ms apart, newest first (in one batch, then one per batch), may only put
    60 in any 60 s, as they would oldest first."""
    key, meter_id = _registered(database_url, make_meter_id)
    falling = [candidate(key, meter_id, s, T0 - s, 1000 - s, 0) for s in range(1, 101)]
    assert _commit(database_url, falling) == ["accepted"] * 60 + ["rate_limited"] * 40
    one_by_one = [candidate(key, meter_id, s, T0 - s, 1000 - s, 0) for s in range(101, 201)]
    assert [_commit(database_url, [c])[0] for c in one_by_one] == ["rate_limited"] * 100
    assert _fullest_window(_stored_ts(database_url, meter_id), 60_000) == 60

    other_key, other = _registered(database_url, make_meter_id)
    stepping = [candidate(other_key, other, s, T0 - s * 1000, 1000 - s, 0) for s in range(1, 200)]
    for c in stepping:  # one a second, newest first: never over the limit
        assert _commit(database_url, [c]) == ["accepted"]


def test_a_late_reading_cannot_overfill_a_window_of_stored_readings(
    database_url: str, make_meter_id: Callable[[], str]
) -> None:
    """60 readings stored at 1 s .. 60 s; one arriving late at 0.5 s would make 61 in the
    window 0.5 s .. 60.499 s. At -0.001 s every window holding it ends before 60 s, which
    leaves it 59 stored companions: accepted. The window's ends are those of the count for a
    reading in order, (ts - 60 s, ts]."""
    key, meter_id = _registered(database_url, make_meter_id)
    stored = [candidate(key, meter_id, s, T0 + s * 1000, 100 + s, 0) for s in range(1, 61)]
    assert _commit(database_url, stored) == ["accepted"] * 60
    assert _commit(database_url, [candidate(key, meter_id, 61, T0 + 500, 100, 0)]) == [
        "rate_limited"
    ]
    assert _commit(database_url, [candidate(key, meter_id, 62, T0 - 1, 100, 0)]) == ["accepted"]
    # and the same with the late readings in the batch that fills the window
    key, meter_id = _registered(database_url, make_meter_id)
    batch = [
        *(candidate(key, meter_id, s, T0 + s * 1000, 100 + s, 0) for s in range(1, 61)),
        candidate(key, meter_id, 61, T0 + 500, 100, 0),
        candidate(key, meter_id, 62, T0 - 1, 100, 0),
    ]
    assert _commit(database_url, batch) == ["accepted"] * 60 + ["rate_limited", "accepted"]


def test_readings_with_equal_ts_are_ordered_by_seq(
    database_url: str, make_meter_id: Callable[[], str]
) -> None:
    """Rule 8 in (ts, seq) order: a reading with the ts of a stored one and a higher seq
    comes after it, with a lower seq before it, and its registers are held to that place.
    Accepting seq 2 below seq 1 would then let seq 3 be judged against seq 2: 500 -> 200."""
    key, meter_id = _registered(database_url, make_meter_id)
    assert _commit(database_url, [candidate(key, meter_id, 1, T0, 500, 0)]) == ["accepted"]
    assert _commit(database_url, [candidate(key, meter_id, 2, T0, 100, 0)]) == [
        "register_decreased"
    ]
    assert _commit(database_url, [candidate(key, meter_id, 3, T0 + 1000, 200, 0)]) == [
        "register_decreased"
    ]
    assert _commit(database_url, [candidate(key, meter_id, 5, T0 + 2000, 700, 0)]) == ["accepted"]
    # a lower seq at the same ts comes before: its registers must not exceed seq 5's
    assert _commit(
        database_url,
        [candidate(key, meter_id, 4, T0 + 2000, 800, 0), candidate(key, meter_id, 6, T0, 500, 0)],
    ) == ["register_decreased", "accepted"]
    # within one batch too, and equal registers are fine
    key, meter_id = _registered(database_url, make_meter_id)
    assert _commit(
        database_url,
        [
            candidate(key, meter_id, 1, T0, 500, 0),
            candidate(key, meter_id, 2, T0, 100, 0),
            candidate(key, meter_id, 3, T0, 500, 0),
        ],
    ) == ["accepted", "register_decreased", "accepted"]


def _waiting_for_a_lock(database_url: str, application_name: str) -> bool:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND wait_event_type = 'Lock'",
            (application_name,),
        ).fetchone()
    return row is not None and row[0] > 0


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (MeterStatus.QUARANTINED, "meter_not_active"),
        (MeterStatus.DECOMMISSIONED, "meter_not_active"),
        (MeterStatus.MAINTENANCE, "accepted"),
    ],
)
def test_a_status_committed_while_the_batch_waits_for_the_lock_decides_rule_3(
    database_url: str, make_meter_id: Callable[[], str], status: MeterStatus, outcome: str
) -> None:
    """The worker verified the readings while the meter was active (its cached snapshot);
    another session changes the status and holds the meter's lock while the batch's
    transaction waits for it. Once it commits, the batch must see the new status: a
    quarantined or decommissioned meter's readings are refused and recorded as any
    rejection (rejected row, security event), nothing is stored; maintenance still accepts."""
    key, meter_id = _registered(database_url, make_meter_id)
    batch = [candidate(key, meter_id, s, T0 + s * 1000, 100 + s, 0) for s in (1, 2)]
    name = f"store-{meter_id}"[:63]
    results: list[list[str]] = []
    with psycopg.connect(database_url) as operator:
        operator.execute(
            "UPDATE meters SET status = %s::meter_status WHERE meter_id = %s",
            (status.value, meter_id),
        )

        def store_batch() -> None:
            with psycopg.connect(
                database_url, autocommit=True, options=STORE_OPTIONS, application_name=name
            ) as conn:
                store = ReadingStore(conn, limit=RateLimit(), policy=QuarantinePolicy())
                results.append([_named(o) for o in store.commit_batch(batch, []).outcomes])

        worker = threading.Thread(target=store_batch)
        worker.start()
        wait_until(
            lambda: _waiting_for_a_lock(database_url, name), what="the batch waits for the lock"
        )
        operator.commit()
        worker.join(timeout=30)
    assert results == [[outcome, outcome]]
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            "SELECT count(*) FROM reading_log WHERE meter_id = %s", (meter_id,)
        ).fetchone()
        rejected = conn.execute(
            "SELECT reason, detail FROM rejected_readings WHERE meter_id = %s ORDER BY seq",
            (meter_id,),
        ).fetchall()
        events = conn.execute(
            "SELECT type FROM security_events WHERE meter_id = %s AND type <> 'status_changed'"
            " AND type <> 'registered'",
            (meter_id,),
        ).fetchall()
    if outcome == "accepted":
        assert (stored, rejected) == ((2,), [])
    else:
        assert stored == (0,)
        assert rejected == [("meter_not_active", f"meter status is {status.value}")] * 2
        assert events == [("inactive_meter_reading",)] * 2
