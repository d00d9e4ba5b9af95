"""The chaos campaign: its plan and audit logic with plain values and a database corrupted on
purpose, and a small campaign with every fault kind against a real stack of its own."""

from __future__ import annotations

import random
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from meterproof.bridge.mint import UNITS_PER_WH
from meterproof.chaos.audit import (
    AnchorCheck,
    Audit,
    MintCheck,
    StoreCheck,
    check_anchoring,
    check_store,
    compare,
    expected_mints,
)
from meterproof.chaos.campaign import CampaignResult, run_campaign
from meterproof.chaos.faults import Effect, FaultRecord, Injector, ProductProcess, Target
from meterproof.chaos.plan import (
    FULL_COUNTS,
    HA_KINDS,
    SINGLE_KINDS,
    CampaignConfig,
    FaultKind,
    PlanError,
    PlannedFault,
    expected_cost_s,
    full_config,
    make_plan,
    quick_config,
)
from meterproof.chaos.report import KEPT_MARKER, render, write
from meterproof.stack.redis import RedisServer

# ---------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------


def test_full_plan_has_the_issue_counts_and_fits_the_window_in_order() -> None:
    config = full_config()
    plan = make_plan(config)
    assert {kind: n for kind, n in plan.counts().items() if n} == dict(FULL_COUNTS)
    assert plan.counts()[FaultKind.WORKER_KILL] >= 20
    assert plan.counts()[FaultKind.BRIDGE_KILL] >= 10
    start, end = plan.window
    assert config.duration_s <= 900
    assert all(start <= f.at_s <= end for f in plan.faults)
    for before, after in zip(plan.faults, plan.faults[1:], strict=False):
        # each fault's slot leaves room for its expected cost before the next one
        assert (
            after.at_s >= before.at_s + expected_cost_s(before.kind, config, before.variant) - 0.01
        )
    assert {f.outage_s for f in plan.faults if f.kind is FaultKind.POSTGRES_STOP} == {20.0}
    variants = {f.variant for f in plan.faults if f.kind is FaultKind.BRIDGE_KILL}
    assert variants == {"random", "before_submit", "during_submit", "after_submit"}


def test_quick_plan_covers_every_kind_within_three_minutes() -> None:
    config = quick_config()
    assert config.duration_s <= 180
    counts = make_plan(config).counts()
    assert {kind for kind, n in counts.items() if n >= 1} == set(FaultKind) - HA_KINDS


def test_ha_quick_plan_swaps_the_postgres_stop_for_the_clusters_faults() -> None:
    config = quick_config(ha=True)
    assert config.duration_s <= 300
    counts = make_plan(config).counts()
    assert {kind for kind, n in counts.items() if n >= 1} == set(FaultKind) - SINGLE_KINDS
    assert make_plan(full_config(ha=True)).counts()[FaultKind.PRIMARY_KILL] >= 3


def test_a_fault_of_the_other_stack_is_refused() -> None:
    with pytest.raises(ValueError, match="pg_primary_kill9 need --ha"):
        CampaignConfig(duration_s=900, counts={FaultKind.PRIMARY_KILL: 1})
    with pytest.raises(ValueError, match="postgres_stop need no --ha"):
        CampaignConfig(duration_s=900, counts={FaultKind.POSTGRES_STOP: 1}, ha=True)


def test_plan_is_reproducible_from_its_seed_and_differs_across_seeds() -> None:
    a, b, c = (make_plan(full_config(seed=s)) for s in (7, 7, 8))
    assert a == b
    assert [f.kind for f in a.faults] != [f.kind for f in c.faults]


def test_a_plan_that_cannot_fit_its_bound_is_refused() -> None:
    with pytest.raises(PlanError, match="fault window"):
        make_plan(full_config(duration_s=300))
    with pytest.raises(ValueError, match="at least 2 s"):
        full_config(interval_s=1.0)


# ---------------------------------------------------------------------------------------
# audit logic
# ---------------------------------------------------------------------------------------


def test_compare_counts_lost_duplicated_unexpected_and_inconsistent() -> None:
    generated = {"a": 3, "b": 2}
    clean = [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2)]
    ok = compare(generated, clean, clean)
    assert (ok.generated, ok.stored, ok.lost, ok.duplicated, ok.unexpected) == (5, 5, 0, 0, 0)
    assert ok.inconsistent == 0

    log = [("a", 1), ("a", 3), ("b", 1), ("b", 2), ("b", 9)]
    rows = [("a", 1), ("a", 3), ("a", 3), ("a", 3), ("b", 1), ("b", 9)]
    bad = compare(generated, log, rows)
    assert bad.lost == 1  # a/2 nowhere
    assert bad.duplicated == 2  # a/3 three times
    assert bad.unexpected == 1  # b/9 was never generated
    assert bad.inconsistent == 1  # b/2 only in reading_log
    assert bad.stored == 4
    assert any("lost a seq 2" in e for e in bad.examples)


def test_expected_mints_follow_the_first_anchored_reading_not_seq_1() -> None:
    rows = [
        # meter a: seq 1 arrived late, in batch 2, so the baseline is seq 2 in batch 1
        ("a", 1, 2_000, 2, 150),
        ("a", 1, 3_000, 3, 190),
        ("a", 2, 1_000, 1, 100),
        # meter b: no export increase, no mint
        ("b", 1, 1_000, 1, 40),
        ("b", 1, 2_000, 2, 40),
    ]
    assert expected_mints(rows) == {"a": 40 * UNITS_PER_WH}


def _insert_reading(conn: psycopg.Connection[object], meter: str, seq: int, ts: datetime) -> None:
    digest = seq.to_bytes(32, "big")
    conn.execute(
        "INSERT INTO readings (meter_id, seq, ts, import_wh, export_wh, alg, sig, reading_hash,"
        " received_at, verified_at) VALUES (%s, %s, %s, %s, 0, 'EdDSA', %s, %s, now(), now())",
        (meter, seq, ts, seq, b"s" * 64, digest),
    )


def test_audit_finds_a_gap_and_a_duplicate_across_partitions(
    database_url: str, meter_id: str
) -> None:
    ts = datetime.now(UTC).replace(microsecond=0)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO meters (meter_id) VALUES (%s)", (meter_id,))
        for seq in (1, 2, 3):  # seq 4 generated, never stored
            _insert_reading(conn, meter_id, seq, ts + timedelta(seconds=seq))
            conn.execute(
                "INSERT INTO reading_log (meter_id, seq, reading_hash, ts, import_wh, export_wh)"
                " VALUES (%s, %s, %s, %s, %s, 0)",
                (meter_id, seq, seq.to_bytes(32, "big"), ts + timedelta(seconds=seq), seq),
            )
        clean = check_store(conn, {meter_id: 3})
        assert (clean.lost, clean.duplicated, clean.inconsistent) == (0, 0, 0)

        # the same (meter_id, seq) a day earlier lands in another partition: no key stops it
        _insert_reading(conn, meter_id, 2, ts - timedelta(days=1))
        store = check_store(conn, {meter_id: 4})
        anchor = check_anchoring(conn)
    assert (store.generated, store.stored, store.lost, store.duplicated) == (4, 3, 1, 1)
    assert anchor.unanchored == 3
    assert anchor.anchored == 0
    audit = Audit(store, anchor, MintCheck(0, 0, 0), True, "OK")
    problems = audit.problems()
    assert "1 readings lost" in problems
    assert "1 duplicate rows" in problems
    assert "3 stored readings not anchored" in problems
    assert not audit.clean


def _clean_audit() -> Audit:
    """An audit of 10 readings that found nothing wrong."""
    return Audit(
        StoreCheck(generated=10, stored=10, lost=0, duplicated=0, unexpected=0, inconsistent=0),
        AnchorCheck(10, 0, 1, 0, 0, 1, 10),
        MintCheck(0, 0, 0),
        True,
        "OK",
    )


def test_a_clean_audit_does_not_pass_a_campaign_whose_faults_did_not_happen() -> None:
    """The audit checks the readings; whether the faults it survived happened is the
    campaign's to check: a fault skipped because the fleet ended, or a kill that found
    no process, would otherwise pass as a campaign with every fault kind."""
    config = quick_config()
    plan = make_plan(config)
    audit = _clean_audit()

    def record(kind: FaultKind, kills: int, note: str = "") -> FaultRecord:
        return FaultRecord(kind, "-", 0.0, 1.0, 2.0, 1.0, kills, note)

    every = [record(f.kind, 1) for f in plan.faults]
    result = CampaignResult(config, plan, {}, datetime.now(UTC), fleet={"sent": 10}, audit=audit)
    result.faults = every
    assert result.problems() == []
    result.faults = every[:-2]
    assert result.problems() == [f"2 of {len(plan.faults)} planned faults not injected"]
    result.faults = [*every[:-1], record(FaultKind.WORKER_KILL, 0, "no live worker to kill")]
    assert result.problems() == ["worker_kill9 at 1.0 s did not happen: no live worker to kill"]
    assert not result.ok


def test_a_clean_audit_does_not_pass_a_fault_without_its_effect_or_its_recovery() -> None:
    """A fault can take place yet miss what it exists to exercise (no standby to freeze, a
    bridge that never reached its crash point), or leave the product unrecovered past the
    timeout: each is a problem of the campaign, whatever the audit says."""
    config = quick_config(ha=True)
    plan = make_plan(config)
    audit = _clean_audit()
    every = [FaultRecord(f.kind, f.variant, 0.0, 1.0, 2.0, 1.0, 2) for f in plan.faults]
    result = CampaignResult(config, plan, {}, datetime.now(UTC), fleet={"sent": 10}, audit=audit)
    result.faults = every
    assert result.problems() == []

    no_standby = FaultRecord(
        FaultKind.STANDBY_FREEZE, "-", 0.0, 1.0, 1.0, 0.0, 0, "no standby to freeze", hit=False
    )
    missed_crash = FaultRecord(
        FaultKind.BRIDGE_KILL, "before_submit", 0.0, 3.0, 40.0, 1.0, 2,
        "did not reach before_submit in time (exit None); killed", hit=False,
    )  # fmt: skip
    unrecovered = FaultRecord(FaultKind.REDIS_STOP, "-", 0.0, 50.0, 52.0, None)
    no_failover = FaultRecord(
        FaultKind.PRIMARY_KILL, "-", 0.0, 60.0, 90.0, None, 1,
        "pg-0 -> -; no reading stored within 30 s of the kill",
    )  # fmt: skip
    result.faults = [*every[:-4], no_standby, missed_crash, unrecovered, no_failover]
    assert result.problems() == [
        "pg_standby_frozen at 1.0 s did not happen: no standby to freeze",
        "bridge_kill9 (before_submit) at 3.0 s did not happen:"
        " did not reach before_submit in time (exit None); killed",
        f"redis_stop at 50.0 s not recovered within {config.recovery_timeout_s:g} s",
        f"pg_primary_kill9 at 60.0 s not recovered within {config.recovery_timeout_s:g} s:"
        " pg-0 -> -; no reading stored within 30 s of the kill",
    ]
    assert not result.ok


#: A stand-in bridge: it lives until killed, unless MODE makes it exit by itself at start
#: ("dies") or, once armed with a crash point, either die there of its own SIGKILL
#: ("honours") or exit 3 before reaching it ("crashes").
_BRIDGE = """
import os, signal, sys, time
mode, armed = os.environ["MODE"], os.environ.get("METERPROOF_BRIDGE_CRASH_AT")
if mode == "dies":
    sys.exit(4)
if armed and mode == "honours":
    os.kill(os.getpid(), signal.SIGKILL)
if armed:
    sys.exit(3)
time.sleep(60)
"""


@pytest.mark.parametrize(
    ("mode", "variant", "kills", "hit", "note", "exits"),
    [
        ("honours", "before_submit", 2, True, "then killed itself at before_submit", []),
        # the armed restart's own exit is no kill: one SIGKILL, not two
        ("crashes", "before_submit", 1, False, "exited on its own before before_submit (exit 3)",
         [3]),
        # nothing to kill: the bridge had died before the fault
        ("dies", "random", 0, True, "had exited on its own (exit 4)", [4]),
    ],
)  # fmt: skip
def test_a_bridge_fault_counts_only_the_kills_it_delivered(
    tmp_path: Path, mode: str, variant: str, kills: int, hit: bool, note: str, exits: list[int]
) -> None:
    """The armed restart must die of its own SIGKILL at the crash point; one that exits
    otherwise never ran that step of anchoring, and a bridge that exited by itself was not
    killed: its exit is recorded as one nobody asked for."""
    argv = [sys.executable, "-c", _BRIDGE]
    bridge = ProductProcess("bridge", argv, {"MODE": mode}, tmp_path / "bridge.log")
    bridge.start()
    if mode == "dies":
        assert bridge.wait_exit(30) == 4
    target = Target(quick_config(), None, None, None, None, bridge, tmp_path, "")
    injector = Injector(target, load_started=0.0, rng=random.Random(1))
    try:
        effect = injector._kill_bridge(variant)
    finally:
        bridge.kill9()
    assert (effect.kills, effect.hit, effect.note) == (kills, hit, note)
    assert bridge.unexpected_exits == exits


def test_a_stop_that_finds_its_server_down_did_not_happen(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Redis down before the fault: the fault stopped nothing, so it exercised nothing."""
    redis_server.stop()
    target = Target(quick_config(), None, redis_server, None, None, None, tmp_path, "")
    injector = Injector(target, load_started=0.0, rng=random.Random(1))
    effect = injector._inject(PlannedFault(FaultKind.REDIS_STOP, 0.0, outage_s=0.1))
    assert effect == Effect(0, "it was not running", hit=False)
    assert redis_server.is_running()


# ---------------------------------------------------------------------------------------
# a small campaign, every fault kind once
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_small_campaign_with_every_fault_kind_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    config = CampaignConfig(
        duration_s=130,
        counts=dict.fromkeys(set(FaultKind) - HA_KINDS, 1),
        meters=30,
        workers=2,
        seed=3,
        warmup_s=8,
        cooldown_s=3,
        settle_s=30,  # a bound: the fleet ends as soon as every receipt is in
        postgres_outage_s=4,
        redis_outage_s=2,
        recovery_timeout_s=20,
        epoch_s=2,
        seal_delay_s=0.5,
        republish_after_s=3,
    )
    lines: list[str] = []
    # not tmp_path: PostgreSQL's own user must reach the directory (pytest's are 0700)
    with tempfile.TemporaryDirectory(prefix="meterproof-chaos-test-") as work_dir:
        result = run_campaign(config, work_dir=Path(work_dir), say=lines.append)

    assert result.audit is not None, "\n".join(lines)
    assert result.problems() == [], "\n".join(lines)
    injected = {f.kind for f in result.faults}
    assert injected == set(FaultKind) - HA_KINDS, "\n".join(lines)
    store = result.audit.store
    assert store.generated == 30 * config.readings_per_meter
    assert store.stored == store.generated
    assert (store.lost, store.duplicated) == (0, 0)
    assert result.audit.anchor.anchored == store.generated
    assert result.audit.verify_line.startswith("OK")
    killed = [f for f in result.faults if f.kind is FaultKind.WORKER_KILL]
    assert killed[0].kills == 1
    assert "worker" in killed[0].note

    report = render(result, command="pytest")
    assert "## Run: PASSED" in report
    assert f"| generated (every meter's seqs 1..{config.readings_per_meter}) |" in report
    assert "| lost | 0 |" in report
    assert result.machine["cores"] in report

    # A new run replaces the figures and keeps the hand-written part after the marker.
    path = tmp_path / "reliability.md"
    path.write_text(f"old figures\n{KEPT_MARKER}\n## Hand-written\n", encoding="utf-8")
    write(result, path, command="pytest")
    text = path.read_text(encoding="utf-8")
    assert "old figures" not in text
    assert text == report + f"{KEPT_MARKER}\n## Hand-written\n"
