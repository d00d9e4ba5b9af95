"""The bridge against real PostgreSQL (and Mosquitto where the flow needs it): roots,
late readings, mints, a sink that is down, the sink's own guarantees, kill -9 of the
bridge process at each step of anchoring, and the retained epoch summary.

In-process tests drive `Runner.run_once` with a fixed clock and 1-second epochs starting
at T0; the process tests run `python -m meterproof bridge` on the wall clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psycopg
import pytest
from bridge_harness import (
    EPOCH_MS,
    T0,
    Clock,
    Fleet,
    in_process,
    make_fleet,
    query,
    rfc6962_root,
    settings_for,
)
from ingest_harness import SilentProxy
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_until

from meterproof.bridge.batches import BatchStore
from meterproof.bridge.entry import GENESIS, Entry, seal
from meterproof.bridge.ledger.local import LocalSink
from meterproof.bridge.ledger.sink import SinkRejectedError
from meterproof.bridge.mint import UNITS_PER_WH, Mint
from meterproof.bridge.oracle import Oracle, load_oracle
from meterproof.bridge.proof import _FIND, build_proof, check_proof
from meterproof.bridge.publish import SummaryPublisher
from meterproof.bridge.runner import Runner
from meterproof.bridge.telemetry import SUBMISSIONS_FAILED
from meterproof.bridge.verify import verify
from meterproof.certs.layout import PkiLayout
from meterproof.certs.tls import client_context
from meterproof.db.silence import SILENT
from meterproof.schemas.reading import SignedReading, b64url
from meterproof.schemas.signatures import generate_private_key
from meterproof.schemas.signing import reading_hash, signing_bytes
from meterproof.schemas.timestamps import ms_to_dt, wall_ms
from meterproof.stack.broker import BrokerServer
from meterproof.stack.postgres import PostgresServer
from meterproof.stack.process import free_port

# ---------------------------------------------------------------------------------------
# helpers (the fleet and the in-process bridge are in bridge_harness)
# ---------------------------------------------------------------------------------------


@pytest.fixture
def oracle(pki: PkiLayout) -> Oracle:
    return load_oracle(pki.oracle_key)


def verify_ok(database_url: str, oracle: Oracle) -> int:
    with (
        psycopg.connect(database_url, autocommit=True) as a,
        psycopg.connect(database_url, autocommit=True) as b,
    ):
        report = verify(a, b, oracle.public_key)
    assert report.discrepancy is None, str(report.discrepancy)
    return report.anchored_readings


def assert_each_reading_anchored_once(database_url: str) -> None:
    """Every stored reading is claimed by exactly one anchored batch, and the batches'
    counts add up to the stored readings (none left out, none twice)."""
    (stored, claimed, anchored, counted), *_ = query(
        database_url,
        "SELECT (SELECT count(*) FROM readings),"
        " (SELECT count(*) FROM reading_log WHERE batch_id IS NOT NULL),"
        " (SELECT count(*) FROM reading_log l JOIN bridge_batches b ON b.batch = l.batch_id"
        "   WHERE b.status = 'anchored'),"
        " (SELECT coalesce(sum(reading_count), 0) FROM ledger_entries)",
    )
    assert stored == claimed == anchored == counted


def minted_per_meter(database_url: str) -> dict[str, int]:
    return {
        str(m): int(u)
        for m, u in query(
            database_url, "SELECT meter_id, sum(grid_units) FROM ledger_mints GROUP BY meter_id"
        )
    }


def expected_mint_per_meter(database_url: str) -> dict[str, int]:
    """(highest anchored export - export of the first anchored reading) * 10**15, computed
    straight from the stored readings and their batches."""
    rows = query(
        database_url,
        "SELECT l.meter_id, l.batch_id, l.ts, l.seq, r.export_wh FROM reading_log l"
        " JOIN readings r USING (meter_id, seq) JOIN bridge_batches b ON b.batch = l.batch_id"
        " WHERE b.status = 'anchored' ORDER BY l.batch_id, l.ts, l.seq",
    )
    first: dict[str, int] = {}
    top: dict[str, int] = {}
    for meter_id, _batch, _ts, _seq, export in rows:
        first.setdefault(meter_id, int(export))
        top[meter_id] = max(top.get(meter_id, 0), int(export))
    return {m: (top[m] - first[m]) * UNITS_PER_WH for m in first if top[m] > first[m]}


# ---------------------------------------------------------------------------------------
# roots, proofs, late readings, mints
# ---------------------------------------------------------------------------------------


def test_roots_equal_an_independent_computation_and_proofs_verify(
    database_url: str, make_meter_id: Callable[[], str], oracle: Oracle
) -> None:
    fleet, (a, b, c) = make_fleet(database_url, make_meter_id, ["wallet-1", "wallet-1", None])
    fleet.store([(a, 1, T0 + 100, 10, 5), (b, 1, T0 + 100, 7, 0), (c, 1, T0 + 900, 0, 1)])
    fleet.store([(a, 2, T0 + 500, 11, 6), (b, 2, T0 + 1500, 8, 3), (a, 3, T0 + 1500, 12, 9)])
    clock = Clock(T0 + 999)
    runner = in_process(database_url, oracle, clock)
    runner.run_once()  # epoch 0 open, readings claimed, nothing due
    assert query(database_url, "SELECT batch, status FROM bridge_batches") == [(1, "open")]
    clock.now = T0 + 2000
    runner.run_once()
    runner.close()

    # Independently: rebuild each stored reading, hash it per the contract, group by epoch
    # (no late readings here), order by (ts, meter_id, seq), RFC 6962 root.
    groups: dict[int, list[tuple[int, str, int, bytes]]] = {}
    for meter_id, seq, ts, imp, exp, sig in query(
        database_url,
        "SELECT meter_id, seq, (extract(epoch FROM ts) * 1000)::bigint, import_wh, export_wh,"
        " sig FROM readings",
    ):
        reading = SignedReading.model_validate(
            {"v": 1, "meter_id": meter_id, "seq": int(seq), "ts": int(ts), "import_wh": int(imp),
             "export_wh": int(exp), "alg": "EdDSA", "sig": b64url(bytes(sig))}
        )  # fmt: skip
        digest = reading_hash(signing_bytes(reading))
        groups.setdefault(int(ts) // EPOCH_MS, []).append((int(ts), meter_id, int(seq), digest))
    entries = query(
        database_url,
        "SELECT seq, epoch, reading_count, merkle_root FROM ledger_entries ORDER BY seq",
    )
    assert [(s, e, n) for s, e, n, _ in entries] == [
        (1, T0 // EPOCH_MS, 4),
        (2, T0 // EPOCH_MS + 1, 2),
    ]
    for _, epoch, _, root in entries:
        leaves = [d for *_, d in sorted(groups[int(epoch)])]
        assert bytes(root) == rfc6962_root(leaves)

    with psycopg.connect(database_url, autocommit=True) as conn:
        for group in groups.values():
            for *_, digest in group:
                checked = check_proof(build_proof(conn, digest), trusted_key=oracle.public_key)
                assert checked.tree_size == len(group)
    assert verify_ok(database_url, oracle) == 6
    assert minted_per_meter(database_url) == {a: 4 * UNITS_PER_WH, b: 3 * UNITS_PER_WH}
    balances = query(database_url, "SELECT wallet, grid_units FROM ledger_balances")
    assert balances == [("wallet-1", 7 * UNITS_PER_WH)]


def test_a_proof_finds_its_reading_through_the_hash_index(database_url: str) -> None:
    """Migration 0012: with sequential scans priced out, the proof's lookup by hash plans
    an index scan on reading_log_hash, not a scan of the whole log (the planner prefers a
    scan on a table this small, so its choice alone would say nothing)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = conn.execute(f"EXPLAIN (FORMAT JSON) {_FIND}", (bytes(32),)).fetchone()
    assert plan is not None
    assert '"Index Name": "reading_log_hash"' in json.dumps(plan[0])


def test_late_readings_are_anchored_once_in_a_later_batch(
    database_url: str, make_meter_id: Callable[[], str], oracle: Oracle
) -> None:
    fleet, (a, b) = make_fleet(database_url, make_meter_id, ["w-a", "w-b"])
    fleet.store([(a, 1, T0 + 100, 0, 100), (a, 3, T0 + 900, 0, 130), (b, 1, T0 + 200, 0, 0)])
    clock = Clock(T0 + 1000)
    runner = in_process(database_url, oracle, clock)
    runner.run_once()
    assert query(database_url, "SELECT reading_count FROM ledger_entries") == [(3,)]

    # A reading of epoch 0 arrives after epoch 0 is anchored, with readings of epoch 3.
    assert fleet.store([(a, 2, T0 + 500, 0, 120), (b, 2, T0 + 3100, 0, 40)]) == ["Accepted"] * 2
    # And one of epoch 0 whose transaction is still open while the bridge seals: a claim by
    # clock would lose it, a claim by `batch_id IS NULL` takes it next time.
    slow_hash = fleet.candidate(b, 3, T0 + 600, 0, 10).reading_hash
    slow = psycopg.connect(database_url)
    slow.execute(
        "INSERT INTO reading_log (meter_id, seq, reading_hash, ts, import_wh, export_wh)"
        " VALUES (%s, 3, %s, %s, 0, 10)",
        (b, slow_hash, ms_to_dt(T0 + 600)),
    )
    clock.now = T0 + 4000
    runner.run_once()  # batch 2 (epoch 1: the late reading), batch 3 (epoch 3)
    slow.execute(
        "INSERT INTO readings (meter_id, seq, ts, import_wh, export_wh, alg, sig, reading_hash,"
        " received_at, verified_at) VALUES (%s, 3, %s, 0, 10, 'EdDSA', %s, %s, now(), now())",
        (b, ms_to_dt(T0 + 600), b"\x00" * 64, slow_hash),
    )
    slow.commit()
    slow.close()
    clock.now = T0 + 6000
    runner.run_once()  # batch 4 (epoch 4): the slow one
    runner.close()

    batches = query(
        database_url,
        "SELECT l.meter_id, l.seq, l.batch_id, b.epoch - %s FROM reading_log l"
        " JOIN bridge_batches b ON b.batch = l.batch_id ORDER BY l.batch_id, l.ts",
        (T0 // EPOCH_MS,),
    )
    assert batches == [
        (a, 1, 1, 0), (b, 1, 1, 0), (a, 3, 1, 0),
        (a, 2, 2, 1),
        (b, 2, 3, 3),
        (b, 3, 4, 4),
    ]  # fmt: skip
    assert_each_reading_anchored_once(database_url)
    # the late reading's export (120) is below what epoch 0 already anchored (130): no mint
    assert query(database_url, "SELECT count(*) FROM ledger_mints WHERE entry = 2") == [(0,)]


def test_slow_transaction_reading_is_not_lost(
    database_url: str, make_meter_id: Callable[[], str], oracle: Oracle
) -> None:
    """Stated on its own: every reading committed after a seal lands in the next batch."""
    fleet, (a,) = make_fleet(database_url, make_meter_id, ["w"])
    fleet.store([(a, 1, T0 + 10, 0, 1)])
    clock = Clock(T0 + 1000)
    runner = in_process(database_url, oracle, clock)
    runner.run_once()
    fleet.store([(a, 2, T0 + 20, 0, 2)])
    clock.now = T0 + 3000
    runner.run_once()
    runner.close()
    assert query(database_url, "SELECT batch_id FROM reading_log ORDER BY seq") == [(1,), (2,)]
    assert verify_ok(database_url, oracle) == 2


def test_minted_totals_equal_the_export_increase_with_shuffled_and_repeated_arrivals(
    database_url: str, make_meter_id: Callable[[], str], oracle: Oracle
) -> None:
    fleet, meters = make_fleet(database_url, make_meter_id, ["w-0", "w-1", None])
    # meter i: 12 readings, 150 ms apart, export rising by 3 + i per reading
    readings = {
        m: [(m, s, T0 + 150 * s, 1000 + s, 500 * i + (3 + i) * s) for s in range(1, 13)]
        for i, m in enumerate(meters)
    }
    arrivals = [
        [readings[meters[0]][5], readings[meters[1]][0], readings[meters[2]][3]],
        [readings[meters[0]][1], readings[meters[0]][5], readings[meters[1]][7]],  # a dup
        [*readings[meters[0]][0:4], readings[meters[2]][0], readings[meters[2]][11]],
        [*readings[meters[1]], readings[meters[0]][11], readings[meters[2]][3]],  # dups
        [*readings[meters[0]], *readings[meters[2]]],  # everything again, the rest new
    ]
    clock = Clock(T0)
    runner = in_process(database_url, oracle, clock)
    outcomes: list[str] = []
    for step, batch in enumerate(arrivals):
        outcomes += fleet.store(batch)
        clock.now = T0 + 400 * (step + 1) + 1000  # epochs close in between: late readings
        runner.run_once()
    clock.now = T0 + 10_000
    runner.run_once()
    runner.close()
    assert "Duplicate" in outcomes
    assert "Rejection" not in outcomes
    minted = minted_per_meter(database_url)
    assert minted == expected_mint_per_meter(database_url)
    # The baseline is each meter's first *anchored* reading: seq 6, 1 and 4 arrived first;
    # the lower readings of meters 0 and 2 that came later mint nothing.
    assert minted == {
        meters[0]: (36 - 18) * UNITS_PER_WH,
        meters[1]: (548 - 504) * UNITS_PER_WH,
        meters[2]: (1060 - 1020) * UNITS_PER_WH,
    }
    assert query(database_url, "SELECT wallet, grid_units FROM ledger_balances ORDER BY 1") == [
        ("w-0", 18 * UNITS_PER_WH),
        ("w-1", 44 * UNITS_PER_WH),
    ]
    assert_each_reading_anchored_once(database_url)
    verify_ok(database_url, oracle)


# ---------------------------------------------------------------------------------------
# the sink: down for a while, and its own guarantees
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sink_down_delays_anchoring_and_batches_land_in_order(
    database_url: str, make_meter_id: Callable[[], str], oracle: Oracle
) -> None:
    fleet, (a,) = make_fleet(database_url, make_meter_id, ["w"])
    fleet.store([(a, s, T0 + 1000 * s, 0, 10 * s) for s in range(3)])
    clock = Clock(T0 + 3000)
    runner = in_process(database_url, oracle, clock, sink_timeout_s=0.2)
    failed_before = SUBMISSIONS_FAILED.labels(code="unavailable")._value.get()
    # The ledger is unreachable for writers: another session holds its table lock.
    blocker = psycopg.connect(database_url)
    blocker.execute("LOCK TABLE ledger_entries IN ACCESS EXCLUSIVE MODE")
    for attempt in range(3):
        clock.now = T0 + 3000 + 1000 * attempt  # past every backoff
        runner.run_once()
    status = query(
        database_url, "SELECT batch, status, attempts, last_error FROM bridge_batches ORDER BY 1"
    )
    assert [(b, s) for b, s, _, _ in status] == [(1, "pending"), (2, "pending"), (3, "pending")]
    # Only the oldest batch is tried: submitted once, then looked up (`fetch`) before any
    # resubmission, which fails just the same while the ledger is unreachable.
    assert status[0][2] == 1
    assert status[1][2] == status[2][2] == 0
    assert "unavailable" in status[0][3]
    assert SUBMISSIONS_FAILED.labels(code="unavailable")._value.get() - failed_before == 3
    blocker.rollback()
    blocker.close()

    clock.now += 1000
    runner.run_once()
    runner.close()
    entries = query(
        database_url,
        "SELECT seq, prev_hash, entry_hash, recorded_at FROM ledger_entries ORDER BY seq",
    )
    assert [e[0] for e in entries] == [1, 2, 3]
    assert bytes(entries[0][1]) == GENESIS
    assert [bytes(e[1]) for e in entries[1:]] == [bytes(e[2]) for e in entries[:-1]]
    assert [e[3] for e in entries] == sorted(e[3] for e in entries)
    assert query(database_url, "SELECT DISTINCT status FROM bridge_batches") == [("anchored",)]
    verify_ok(database_url, oracle)


def test_a_silent_database_fails_the_pass_and_anchoring_resumes_on_new_connections(
    postgres: PostgresServer, database_url: str, make_meter_id: Callable[[], str], oracle: Oracle
) -> None:
    """The primary stops answering and keeps the bridge's connections open (its machine
    paused; new connections reach a new primary): a pass waited on its socket for good. It
    fails after `database_timeout_s`, the ledger's next call after twice its timeout, and
    the batch sealed meanwhile is anchored on new connections, once."""
    fleet, (a,) = make_fleet(database_url, make_meter_id, ["w"])
    fleet.store([(a, 0, T0, 0, 0)])
    proxy = SilentProxy(postgres.port)
    bridge_cuts, ledger_cuts = SILENT.labels(wait="bridge"), SILENT.labels(wait="ledger")
    before = bridge_cuts._value.get(), ledger_cuts._value.get()

    async def scenario() -> tuple[float, int]:
        async with proxy.serving(database_url) as via:
            clock = Clock(T0 + EPOCH_MS)
            runner = in_process(via, oracle, clock, database_timeout_s=1)
            try:
                await asyncio.to_thread(runner.run_once)  # batch 1, over both connections
                fleet.store([(a, 1, T0 + EPOCH_MS, 0, 10)])
                clock.now += EPOCH_MS
                proxy.silence()
                started = time.monotonic()
                await asyncio.wait_for(asyncio.to_thread(runner.run_once), 20)
                failed_s = time.monotonic() - started
                assert not runner.ready()
                for passes in range(1, 10):
                    clock.now += EPOCH_MS  # past every backoff
                    await asyncio.wait_for(asyncio.to_thread(runner.run_once), 20)
                    if len(query(database_url, "SELECT 1 FROM ledger_entries")) == 2:
                        return failed_s, passes
                raise AssertionError("batch 2 not anchored")
            finally:
                await asyncio.to_thread(runner.close)

    failed_s, passes = asyncio.run(scenario())
    assert 0.5 < failed_s < 5, failed_s
    assert passes <= 2
    assert (bridge_cuts._value.get() - before[0], ledger_cuts._value.get() - before[1]) == (1, 1)
    assert query(database_url, "SELECT DISTINCT status FROM bridge_batches") == [("anchored",)]
    assert_each_reading_anchored_once(database_url)
    verify_ok(database_url, oracle)


def _sealed(
    database_url: str, oracle: Oracle, fleet: Fleet, meter: str, epochs: int
) -> list[Entry]:
    fleet.store([(meter, s, T0 + 1000 * s, 0, s) for s in range(epochs)])
    with psycopg.connect(database_url, autocommit=True) as conn:
        step = BatchStore(conn).advance(
            T0 + 1000 * epochs, epoch_ms=EPOCH_MS, delay_ms=0, oracle=oracle
        )
    return step.sealed


def test_sink_deduplicates_and_refuses_conflicts_gaps_and_strangers(
    database_url: str, make_meter_id: Callable[[], str], oracle: Oracle
) -> None:
    fleet, (a,) = make_fleet(database_url, make_meter_id, ["w"])
    first, second = _sealed(database_url, oracle, fleet, a, 2)
    sink = LocalSink(database_url, trusted_key=oracle.public_key, timeout_s=2)
    with pytest.raises(SinkRejectedError) as gap:
        sink.submit(second, second.header.idempotency_key)
    assert gap.value.code == "out_of_order"
    assert sink.fetch(first.header.idempotency_key) is None
    receipt = sink.submit(first, first.header.idempotency_key)
    assert sink.submit(first, first.header.idempotency_key) == receipt  # deduplicated
    assert sink.fetch(first.header.idempotency_key) == receipt
    assert (receipt.position, receipt.entry_hash) == (1, first.header.entry_hash)

    with pytest.raises(SinkRejectedError) as forged:
        sink.submit(
            Entry(second.header, second.signature, (Mint(a, "w", 2, 0),)),
            second.header.idempotency_key,
        )
    assert forged.value.code == "invalid_entry"  # mint list does not match the signed header
    stranger_key = generate_private_key("EdDSA")
    stranger = Entry(second.header, stranger_key.sign(second.header.encode()), second.mints)
    with pytest.raises(SinkRejectedError, match="signature"):
        sink.submit(stranger, second.header.idempotency_key)
    untrusted = LocalSink(database_url, trusted_key=bytes(32), timeout_s=2)
    with pytest.raises(SinkRejectedError, match="not trusted"):
        untrusted.submit(second, second.header.idempotency_key)
    untrusted.close()
    with pytest.raises(SinkRejectedError, match="does not name"):
        sink.submit(second, first.header.idempotency_key)
    sink.submit(second, second.header.idempotency_key)
    # Same epoch, batch and root (so the same key) but another mint list: a second entry
    # the oracle signed for one batch, e.g. after restoring an old bridge database.
    h = second.header
    twin = seal(
        batch=h.batch, epoch=h.epoch, epoch_ms=h.epoch_ms, prev_hash=h.prev_hash,
        merkle_root=h.merkle_root, reading_count=h.reading_count, mints=[Mint(a, "w", 7, 0)],
        oracle=oracle.key, oracle_key=oracle.public_key,
    )  # fmt: skip
    assert twin.header.idempotency_key == h.idempotency_key
    with pytest.raises(SinkRejectedError) as conflict:
        sink.submit(twin, h.idempotency_key)
    assert conflict.value.code == "conflict"
    sink.close()
    assert query(database_url, "SELECT count(*) FROM ledger_entries") == [(2,)]


def test_the_ledger_refuses_update_delete_and_truncate(
    database_url: str, make_meter_id: Callable[[], str], oracle: Oracle
) -> None:
    fleet, (a,) = make_fleet(database_url, make_meter_id, ["w"])
    runner = in_process(database_url, oracle, Clock(T0 + 3000))
    fleet.store([(a, 1, T0 + 1, 0, 1), (a, 2, T0 + 1001, 0, 5)])
    runner.run_once()
    runner.close()
    for statement in (
        "UPDATE ledger_entries SET reading_count = 0",
        "DELETE FROM ledger_entries WHERE seq = 2",
        "TRUNCATE ledger_entries CASCADE",
        "UPDATE ledger_mints SET grid_units = 0",
        "DELETE FROM ledger_mints",
        "TRUNCATE ledger_mints",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            query(database_url, statement)
    assert query(database_url, "SELECT count(*) FROM ledger_entries") == [(2,)]


# ---------------------------------------------------------------------------------------
# kill -9 of the bridge process at each step of anchoring
# ---------------------------------------------------------------------------------------


def _bridge_process(
    database_url: str, pki: PkiLayout, cwd: Path, *, crash_at: str | None, mqtt_port: int
) -> subprocess.Popen[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("METERPROOF_")},
        "METERPROOF_DATABASE_URL": database_url,
        "METERPROOF_PKI_ROOT": str(pki.root),
        "METERPROOF_MQTT_PORT": str(mqtt_port),
        "METERPROOF_METRICS_PORT": "0",
        "METERPROOF_LOG_LEVEL": "WARNING",
        "METERPROOF_RETRY_INITIAL_S": "0.05",
        "METERPROOF_RETRY_MAX_S": "0.2",
    }
    if crash_at:
        env["METERPROOF_BRIDGE_CRASH_AT"] = crash_at
    argv = [
        sys.executable,
        "-P",
        "-m",
        "meterproof",
        "bridge",
        "--epoch-seconds",
        "1",
        "--seal-delay",
        "0.1",
    ]
    return subprocess.Popen([*argv, "--claim-interval", "0.1"], env=env, cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("crash_at", "ledger_entries_at_crash"),
    [("before_submit", 0), ("during_submit", 0), ("after_submit", 1)],
)
def test_kill_9_at_each_step_then_restart_anchors_everything_exactly_once(
    database_url: str,
    make_meter_id: Callable[[], str],
    pki: PkiLayout,
    oracle: Oracle,
    tmp_path: Path,
    crash_at: str,
    ledger_entries_at_crash: int,
) -> None:
    fleet, (a, b) = make_fleet(database_url, make_meter_id, ["w-a", None])
    closed = wall_ms() // 1000 * 1000 - 3000  # an epoch that closed 2 s ago
    fleet.store([(a, 1, closed + 1, 5, 100), (a, 2, closed + 500, 6, 160), (b, 1, closed, 0, 3)])
    proc = _bridge_process(database_url, pki, tmp_path, crash_at=crash_at, mqtt_port=free_port())
    assert proc.wait(timeout=30) == -signal.SIGKILL
    (status, attempts), *_ = query(database_url, "SELECT status, attempts FROM bridge_batches")
    assert (status, attempts) == ("pending", 1)
    assert query(database_url, "SELECT count(*) FROM ledger_entries") == [
        (ledger_entries_at_crash,)
    ]

    now = wall_ms()  # more readings, one of them late (in the crashed batch's epoch)
    fleet.store([(a, 3, now, 7, 190), (b, 2, closed + 700, 1, 4), (b, 3, now + 50, 2, 9)])
    proc = _bridge_process(database_url, pki, tmp_path, crash_at=None, mqtt_port=free_port())
    try:
        wait_until(
            lambda: (
                query(
                    database_url,
                    "SELECT count(*) FROM reading_log l LEFT JOIN bridge_batches b"
                    " ON b.batch = l.batch_id WHERE b.status IS DISTINCT FROM 'anchored'",
                )
                == [(0,)]
            ),
            what="every reading anchored",
            within_s=20,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert_each_reading_anchored_once(database_url)
    entries = query(database_url, "SELECT seq, idempotency_key FROM ledger_entries ORDER BY seq")
    keys = query(database_url, "SELECT batch, idempotency_key FROM bridge_batches ORDER BY batch")
    assert entries == keys  # one ledger entry per batch, none twice
    minted = minted_per_meter(database_url)
    assert minted == expected_mint_per_meter(database_url)
    assert minted == {a: 90 * UNITS_PER_WH, b: 6 * UNITS_PER_WH}
    verify_ok(database_url, oracle)


# ---------------------------------------------------------------------------------------
# the epoch summary on ledger/epochs
# ---------------------------------------------------------------------------------------


def _retained_summary(pki: PkiLayout, integrator: str, port: int, timeout: float) -> dict[str, Any]:
    """Subscribe as `integrator` and return the first (retained) ledger/epochs message."""
    files = pki.integrator(integrator)
    context = client_context(cert=files.cert, key=files.key, ca_cert=pki.ca_cert)
    got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{integrator}-{time.time_ns()}")
    client.tls_set_context(context)
    client.on_connect = lambda c, *_: c.subscribe("ledger/epochs", qos=1)
    client.on_message = lambda _c, _u, message: got.put(message)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        message = got.get(timeout=timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    assert message.retain
    return dict(orjson.loads(message.payload))


@pytest.mark.slow
def test_summary_is_retained_on_ledger_epochs_and_waits_for_a_broker_that_was_down(
    database_url: str,
    make_meter_id: Callable[[], str],
    oracle: Oracle,
    pki: PkiLayout,
    integrator_name: str,
    broker: BrokerServer,
) -> None:
    fleet, (a,) = make_fleet(database_url, make_meter_id, ["w"])
    fleet.store([(a, 1, T0 + 10, 0, 1000), (a, 2, T0 + 20, 0, 2500)])
    broker.stop()
    publisher = SummaryPublisher(
        host="127.0.0.1",
        port=broker.port,
        ca_cert=pki.ca_cert,
        identity=pki.service("bridge"),
        client_id=f"bridge-test-{time.time_ns()}",
        topic="ledger/epochs",
    )
    publisher.start()
    settings = settings_for(database_url)
    sink = LocalSink(database_url, trusted_key=oracle.public_key, timeout_s=2)
    runner = Runner(settings, sink=sink, oracle=oracle, publisher=publisher, clock=Clock(T0 + 1000))
    runner.run_once()  # anchored while the broker is down
    runner.close()
    assert query(database_url, "SELECT status FROM bridge_batches") == [("anchored",)]
    broker.start()
    assert publisher.close(flush_s=45)  # reconnected and the broker acknowledged it
    summary = _retained_summary(pki, integrator_name, broker.port, timeout=10)  # a late subscriber
    (entry_hash, root), *_ = query(
        database_url, "SELECT entry_hash, merkle_root FROM ledger_entries"
    )
    assert summary["batch"] == 1
    assert summary["reading_count"] == 2
    assert summary["merkle_root"] == bytes(root).hex()
    assert summary["entry_hash"] == bytes(entry_hash).hex()
    assert summary["minted_grid"] == "1.5"
    assert summary["receipt"]["sink"] == "local"


@pytest.mark.slow
def test_bridge_refuses_to_start_without_the_oracle_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERPROOF_")}
    env["METERPROOF_PKI_ROOT"] = str(tmp_path / "nothing")
    done = subprocess.run(
        [sys.executable, "-P", "-m", "meterproof", "bridge", "--once"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert b"oracle key" in done.stderr
    assert b"certs init" in done.stderr
    assert done.stderr.count(b"\n") == 1


@pytest.mark.slow
def test_bridge_help_explains_itself(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERPROOF_")}
    done = subprocess.run(
        [sys.executable, "-P", "-m", "meterproof", "bridge", "--help"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert b"--epoch-seconds" in done.stdout
    assert b"exactly once" in done.stdout
