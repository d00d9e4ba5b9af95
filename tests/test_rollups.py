"""Rollups kept by the database as batches are stored, against a brute-force computation
from the raw readings: every reading's difference from its predecessor in (ts, seq) order
summed into the interval of its ts. Readings arrive out of order, in several batches, with
republished duplicates, with ts on and next to interval boundaries."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import AsyncConnection, sql
from test_ingest_store import candidate

from meterproof.db.migrate import load_migrations, migrate
from meterproof.db.rollups import Rollup, Width, rollups, rollups_async
from meterproof.ingest.judge import RateLimit
from meterproof.ingest.records import Accepted, Candidate, Duplicate
from meterproof.ingest.security import QuarantinePolicy
from meterproof.ingest.store import ReadingStore
from meterproof.registry import repository
from meterproof.registry.model import NewKey, NewMeter
from meterproof.schemas.signatures import generate_private_key
from meterproof.stack.postgres import PostgresServer

#: A UTC midnight: every width has a boundary here.
MIDNIGHT = 1_767_225_600_000
STEPS_MS = {Width.QUARTER: 900_000, Width.HOUR: 3_600_000, Width.DAY: 86_400_000}
KEY = generate_private_key("EdDSA")


def register(database_url: str, *meter_ids: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        pem = KEY.public_key().pem()
        repository.register(conn, [NewMeter(m, NewKey.parse("EdDSA", pem)) for m in meter_ids])


def store_batches(database_url: str, batches: Sequence[Sequence[Candidate]]) -> list[type]:
    """Each batch in its own transaction through the ingest store; the outcome types."""

    with psycopg.connect(database_url, autocommit=True) as conn:
        store = ReadingStore(conn, limit=RateLimit(1000, 1_000_000), policy=QuarantinePolicy())
        kinds: list[type] = []
        for batch in batches:
            kinds += [type(o) for o in store.commit_batch(batch, []).outcomes]
        return kinds


def brute_force(conn: psycopg.Connection[Any], meter_id: str, width: Width) -> list[Rollup]:
    """From the raw `readings` rows alone."""
    rows = conn.execute(
        "SELECT (extract(epoch FROM ts) * 1000)::int8, seq, import_wh, export_wh FROM readings"
        " WHERE meter_id = %s",
        (meter_id,),
    ).fetchall()
    step = STEPS_MS[width]
    sums: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    previous: tuple[int, int] | None = None
    for ts, _seq, imp, exp in sorted(rows, key=lambda r: (r[0], r[1])):
        bucket = sums[ts - ts % step]
        if previous is not None:
            bucket[0] += int(imp) - previous[0]
            bucket[1] += int(exp) - previous[1]
        bucket[2] += 1
        previous = (int(imp), int(exp))
    return [
        Rollup(datetime.fromtimestamp(start / 1000, UTC), imp, exp, n)
        for start, (imp, exp, n) in sorted(sums.items())
    ]


def all_rollups(conn: psycopg.Connection[Any], meter_id: str, width: Width) -> list[Rollup]:
    return rollups(
        conn, meter_id, width, datetime(1970, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)
    )


def assert_matches_brute_force(conn: psycopg.Connection[Any], meter_id: str) -> None:
    for width in Width:
        assert all_rollups(conn, meter_id, width) == brute_force(conn, meter_id, width)


#: Offsets from MIDNIGHT that sit on and next to 15-minute, hour and day boundaries.
EDGES = [k * 900_000 + d for k in range(-2, 7) for d in (-1, 0, 1)]


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[tuple[int, int, int, int]], list[list[int]]]:
    """(readings as (seq, ts, import, export) with registers rising in (ts, seq) order,
    arrival batches as lists of indexes, duplicates included)."""
    n = draw(st.integers(1, 25))
    times = sorted(
        draw(st.lists(st.sampled_from(EDGES) | st.integers(-1_800_000, 6_000_000), min_size=n,
                      max_size=n))
    )  # fmt: skip
    seqs = draw(st.permutations(range(1, n + 1)))
    ordered = sorted(zip(times, seqs, strict=True))  # (ts, seq) order
    readings = []
    imp = draw(st.integers(0, 10**12))
    exp = draw(st.integers(0, 10**6))
    for ts, seq in ordered:
        imp += draw(st.integers(0, 5_000))
        exp += draw(st.integers(0, 5_000))
        readings.append((seq, MIDNIGHT + ts, imp, exp))
    arrival = draw(st.permutations(range(n)))
    extra = draw(st.lists(st.integers(0, n - 1), max_size=5))  # republished copies
    sent = list(arrival) + extra
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(sent) - 1)), max_size=4)))
    batches = [sent[a:b] for a, b in zip([0, *cuts], [*cuts, len(sent)], strict=True)]
    return readings, [b for b in batches if b]


@pytest.mark.slow
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(history=histories())
def test_rollups_equal_a_brute_force_sum_over_the_raw_readings(
    history: tuple[list[tuple[int, int, int, int]], list[list[int]]],
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    readings, batches = history
    meter_id = make_meter_id()
    register(database_url, meter_id)
    signed = [candidate(KEY, meter_id, seq, ts, imp, exp) for seq, ts, imp, exp in readings]
    kinds = store_batches(database_url, [[signed[i] for i in batch] for batch in batches])
    assert kinds.count(Accepted) == len(readings)  # every copy after the first: Duplicate
    assert kinds.count(Duplicate) == sum(map(len, batches)) - len(readings)
    with psycopg.connect(database_url) as conn:
        assert_matches_brute_force(conn, meter_id)


@st.composite
def gap_histories(draw: st.DrawFn) -> tuple[list[tuple[int, int, int, int]], list[list[int]]]:
    """Like `histories`, but the last batch holds 2-3 readings whose span covers more
    readings than the trigger's range way takes (8 per new reading, plus 32, new ones
    included), so that meter's readings take the per-reading way (migration 0015)."""
    n = draw(st.integers(70, 90))
    steps = draw(st.lists(st.integers(1, 200_000), min_size=n, max_size=n))
    readings = []
    ts, imp, exp = -1_800_000, draw(st.integers(0, 10**9)), 0
    for seq, step in enumerate(steps, start=1):
        ts += step
        imp += draw(st.integers(0, 5_000))
        exp += draw(st.integers(0, 5_000))
        readings.append((seq, MIDNIGHT + ts, imp, exp))
    late = {draw(st.integers(0, 4)), draw(st.integers(n - 5, n - 1))}
    late |= set(draw(st.lists(st.integers(5, n - 6), max_size=1)))
    early = draw(st.permutations([i for i in range(n) if i not in late]))
    cuts = sorted(draw(st.lists(st.integers(1, len(early) - 1), max_size=2)))
    batches = [early[a:b] for a, b in zip([0, *cuts], [*cuts, len(early)], strict=True)]
    return readings, [*batches, sorted(late)]


@pytest.mark.slow
@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(gapped=gap_histories(), interleaved=histories())
def test_rollups_of_both_ways_in_one_batch_equal_the_brute_force_sum(
    gapped: tuple[list[tuple[int, int, int, int]], list[list[int]]],
    interleaved: tuple[list[tuple[int, int, int, int]], list[list[int]]],
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    """One meter's late batch fills gaps across many stored readings (the per-reading
    way), another's lands between few stored ones (the range way), in the same COPYs."""
    meters = [make_meter_id(), make_meter_id()]
    register(database_url, *meters)
    signed = [
        [candidate(KEY, m, seq, ts, imp, exp) for seq, ts, imp, exp in history[0]]
        for m, history in zip(meters, (gapped, interleaved), strict=True)
    ]
    # aligned at their ends, so the gapped meter's late batch shares the last COPY
    n = max(len(gapped[1]), len(interleaved[1]))
    a, b = ([[]] * (n - len(h[1])) + h[1] for h in (gapped, interleaved))
    batches = [
        [*(signed[0][i] for i in x), *(signed[1][i] for i in y)] for x, y in zip(a, b, strict=True)
    ]
    store_batches(database_url, batches)
    with psycopg.connect(database_url) as conn:
        for meter_id in meters:
            assert_matches_brute_force(conn, meter_id)


def test_each_meters_way_in_one_copy_equals_the_brute_force_sum(
    database_url: str, make_meter_id: Callable[[], str]
) -> None:
    """One COPY in which meters take each of the trigger's ways (migration 0016): one new
    reading after all stored ones (the short way, also for a first reading), one between
    stored ones, one at a stored one's ts, two new readings (the range way)."""
    latest, between, same_ts, first, two = meters = [make_meter_id() for _ in range(5)]
    register(database_url, *meters)
    stored = [
        candidate(KEY, m, seq, MIDNIGHT + ts, 1_000 * seq, 10 * seq)
        for m in (latest, between, same_ts, two)
        for seq, ts in ((1, 0), (2, 600_000), (3, 1_200_000))
    ]
    late = [
        candidate(KEY, latest, 4, MIDNIGHT + 1_800_000, 4_500, 41),
        candidate(KEY, between, 4, MIDNIGHT + 300_000, 1_200, 12),
        candidate(KEY, same_ts, 4, MIDNIGHT + 1_200_000, 3_300, 33),
        candidate(KEY, first, 1, MIDNIGHT + 100_000, 7_000, 70),
        candidate(KEY, two, 4, MIDNIGHT + 1_800_000, 4_000, 40),
        candidate(KEY, two, 5, MIDNIGHT + 2_400_000, 5_000, 50),
    ]
    assert store_batches(database_url, [stored, late]) == [Accepted] * 18
    with psycopg.connect(database_url) as conn:
        for meter_id in meters:
            assert_matches_brute_force(conn, meter_id)
        latest_quarters = all_rollups(conn, latest, Width.QUARTER)
    day = datetime.fromtimestamp(MIDNIGHT / 1000, UTC)
    assert latest_quarters == [
        Rollup(day, 1_000, 10, 2),
        Rollup(day + timedelta(minutes=15), 1_000, 10, 1),
        Rollup(day + timedelta(minutes=30), 1_500, 11, 1),
    ]


@pytest.mark.parametrize(
    ("shorts", "left"), [(5, 3), (5, 70), (280, 70)], ids=["few-left", "many-left", "a-fifth-left"]
)
def test_the_short_ways_meters_and_the_rest_in_one_copy_equal_the_brute_force_sum(
    shorts: int, left: int, database_url: str, make_meter_id: Callable[[], str]
) -> None:
    """Migration 0017 takes the short way's meters first; the others follow by name when
    few are left (0018: up to 64, or more that are at most a fifth of the readings), and
    as all of the batch when more are: either way no meter is counted twice or left out.
    Each of the `left` meters' new reading lands between stored ones; the short ones'
    readings come after all of theirs."""
    short = [make_meter_id() for _ in range(shorts)]
    between = [make_meter_id() for _ in range(left)]
    register(database_url, *short, *between)
    stored = [
        candidate(KEY, m, seq, MIDNIGHT + ts, 1_000 * seq, 10 * seq)
        for m in (*short, *between)
        for seq, ts in ((1, 0), (2, 1_200_000))
    ]
    late = [
        *(candidate(KEY, m, 3, MIDNIGHT + 1_800_000, 2_700, 27) for m in short),
        *(candidate(KEY, m, 3, MIDNIGHT + 600_000, 1_400, 14) for m in between),
    ]
    kinds = store_batches(database_url, [stored, late])
    assert kinds == [Accepted] * len(stored + late)
    with psycopg.connect(database_url) as conn:
        for meter_id in (*short, *between):
            assert_matches_brute_force(conn, meter_id)


def test_the_retired_watermark_is_the_predecessor_only_of_readings_after_it(
    database_url: str, make_meter_id: Callable[[], str]
) -> None:
    """Retention leaves each meter's latest retired reading as a watermark (migration
    0005). A new reading after it counts its difference from it (the short way); one
    before it has no predecessor, so it counts none, and stays off the short way."""
    after_mark, before_mark = meters = [make_meter_id(), make_meter_id()]
    register(database_url, *meters)
    with psycopg.connect(database_url) as conn:
        for meter_id in meters:  # what retiring (seq 1, 0 min) and (seq 2, 10 min) leaves
            conn.execute(
                "INSERT INTO reading_watermarks (meter_id, ts, seq, import_wh, export_wh,"
                " max_seq) VALUES (%s, %s, 2, 200, 20, 2)",
                (meter_id, datetime.fromtimestamp((MIDNIGHT + 600_000) / 1000, UTC)),
            )
    late = [
        candidate(KEY, after_mark, 3, MIDNIGHT + 1_200_000, 260, 26),
        candidate(KEY, before_mark, 5, MIDNIGHT + 300_000, 150, 15),
    ]
    assert store_batches(database_url, [late]) == [Accepted, Accepted]
    day = datetime.fromtimestamp(MIDNIGHT / 1000, UTC)
    with psycopg.connect(database_url) as conn:
        assert all_rollups(conn, after_mark, Width.QUARTER) == [
            Rollup(day + timedelta(minutes=15), 60, 6, 1)
        ]
        assert all_rollups(conn, before_mark, Width.QUARTER) == [Rollup(day, 0, 0, 1)]


def test_a_difference_across_a_boundary_belongs_to_the_later_readings_interval(
    database_url: str, meter_id: str
) -> None:
    register(database_url, meter_id)
    before, at = MIDNIGHT - 1, MIDNIGHT  # 23:59:59.999 and 00:00:00.000
    store_batches(
        database_url,
        [
            [candidate(KEY, meter_id, 2, at, 1_500, 20)],
            [candidate(KEY, meter_id, 1, before, 1_000, 5)],
        ],
    )
    day = datetime.fromtimestamp(MIDNIGHT / 1000, UTC)
    with psycopg.connect(database_url) as conn:
        for width in Width:
            got = all_rollups(conn, meter_id, width)
            assert got == [
                Rollup(day - timedelta(milliseconds=STEPS_MS[width]), 0, 0, 1),
                Rollup(day, 500, 15, 1),
            ]
        # bounds are [from, to) on the interval's start
        assert rollups(conn, meter_id, "1h", day, day + timedelta(hours=1)) == [
            Rollup(day, 500, 15, 1)
        ]
        assert rollups(conn, meter_id, Width.HOUR, day - timedelta(hours=1), day) == [
            Rollup(day - timedelta(hours=1), 0, 0, 1)
        ]
        with pytest.raises(ValueError, match="timezone-aware"):
            rollups(conn, meter_id, "1h", day.replace(tzinfo=None), day)
        with pytest.raises(ValueError, match="'5m' is not a valid Width"):
            rollups(conn, meter_id, "5m", day, day)


@pytest.mark.slow
@pytest.mark.parametrize(("width", "per_day"), [(Width.QUARTER, 96), (Width.HOUR, 24)])
def test_a_month_of_quarter_hours_or_hours_reads_back_whole(
    database_url: str, make_meter_id: Callable[[], str], width: Width, per_day: int
) -> None:
    """What the API asks for: a 31-day month of 15-minute rollups (2,976 rows) of one meter
    among others, read through the async function; or its hours, summed from as many. How
    long a read takes is a benchmark's question (docs/scaling.md, "Rollups"), not a test's:
    timed once on a shared machine it failed at 347 ms."""
    meters = [make_meter_id() for _ in range(5)]
    register(database_url, *meters)
    start = datetime.fromtimestamp(MIDNIGHT / 1000, UTC)
    with psycopg.connect(database_url) as conn:
        # every quarter hour for 40 days, for each meter, straight into reading_log
        conn.execute(
            "INSERT INTO reading_log (meter_id, seq, reading_hash, ts, import_wh, export_wh)"
            " SELECT m, i, sha256((m || i)::bytea), %s + i * interval '15 minutes', i * 10, i"
            " FROM unnest(%s::text[]) m, generate_series(1, 40 * 96) i",
            (start, meters),
        )
        conn.commit()
        conn.execute("ANALYZE meter_quarters")
        conn.commit()

    async def read() -> list[Rollup]:
        conn = await AsyncConnection.connect(database_url)
        try:
            return await rollups_async(
                conn, meters[2], width, start + timedelta(days=5), start + timedelta(days=36)
            )
        finally:
            await conn.close()

    got = asyncio.run(read())
    assert len(got) == 31 * per_day
    n = 96 // per_day
    assert {(r.import_wh, r.export_wh, r.readings) for r in got} == {(10 * n, n, n)}


def test_migration_0007_keeps_every_widths_rollups_of_0005(
    postgres: PostgresServer, make_meter_id: Callable[[], str]
) -> None:
    """Readings stored under 0005's trigger (three widths kept), then 0007 (quarters kept,
    hours and days summed when read): each width reads the same, and later batches, out
    of order, roll up as the brute force says."""
    name = f"test_{uuid.uuid4().hex}"
    with psycopg.connect(postgres.database_url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = postgres.database_url(name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:  # `db migrate` as of 0006
            conn.execute(
                "CREATE TABLE schema_migrations (version text PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now(), sha256 text NOT NULL)"
            )
            for migration in [m for m in load_migrations() if m.version < "0007"]:
                conn.execute(migration.sql)
                conn.execute(
                    "INSERT INTO schema_migrations (version, sha256) VALUES (%s, %s)",
                    (migration.version, migration.sha256),
                )
        meter_id = make_meter_id()
        register(url, meter_id)
        signed = [
            candidate(KEY, meter_id, s, MIDNIGHT + s * 700_000, s * 7, s) for s in range(1, 300)
        ]
        store_batches(url, [signed[150:250], signed[:150]])
        with psycopg.connect(url) as conn:
            before = {
                w: [
                    Rollup(b, int(i), int(e), int(n))
                    for b, i, e, n in conn.execute(
                        "SELECT bucket, import_wh, export_wh, readings FROM meter_rollups"
                        " WHERE meter_id = %s AND width = %s ORDER BY bucket",
                        (meter_id, w.value),
                    )
                ]
                for w in Width
            }
        assert "0007_quarter_rollups" in migrate(url)
        with psycopg.connect(url) as conn:
            assert {w: all_rollups(conn, meter_id, w) for w in Width} == before
        store_batches(url, [signed[250:], signed[100:200]])
        with psycopg.connect(url) as conn:
            assert_matches_brute_force(conn, meter_id)
    finally:
        with psycopg.connect(postgres.database_url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
