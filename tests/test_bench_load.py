"""The load generator's arithmetic, one tiny end-to-end run of the real generator
processes against the real broker and a real worker, and one of a whole private stack with
the ledger bridge beside the worker (no timing is asserted)."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from ingest_harness import WorkerProcess, provision, stored_counts, worker_settings
from waiting import wait_until

from meterproof.bench.compare import server_cost
from meterproof.bench.connections import listener_max_connections
from meterproof.bench.load import connect_summary, max_seq, run_tiers
from meterproof.bench.loadgen import plan
from meterproof.bench.loadgen.control import (
    BenchStack,
    Generators,
    followers_subscribed,
    measure,
    settle,
)
from meterproof.bench.loadgen.legs import join_stored
from meterproof.bench.profile import attribute
from meterproof.certs.layout import PkiLayout
from meterproof.config import StackEnv
from meterproof.stack.broker import BrokerServer
from meterproof.stack.process import free_port


def test_split_and_share_cover_everything_evenly() -> None:
    items = [f"m{i}" for i in range(11)]
    slices = plan.split(items, 3)
    assert sorted(x for s in slices for x in s) == sorted(items)
    assert [len(s) for s in slices] == [4, 4, 3]
    assert plan.share(11, 3) == [4, 4, 3]
    assert sum(plan.share(7, 7)) == 7
    with pytest.raises(ValueError, match="at least 1"):
        plan.split(items, 0)


def test_generator_count_respects_the_file_limit() -> None:
    assert plan.generator_count(200) == 2
    assert plan.generator_count(20_000) == 3
    assert plan.generator_count(50_000) * plan.METERS_PER_GENERATOR >= 50_000


def test_presigned_timestamps_stay_in_the_past_and_inside_the_max_age() -> None:
    now = 1_800_000_000_000
    base = plan.ts_base_ms(now, 5_000)
    assert plan.reading_ts(base, 5_000) <= now - 60_000
    assert plan.reading_ts(base, 1) - plan.reading_ts(base, 0) == plan.TS_STEP_MS
    assert now - base <= plan.MAX_BACKDATE_MS
    with pytest.raises(ValueError, match="acceptance window"):
        plan.ts_base_ms(now, plan.MAX_BACKDATE_MS // plan.TS_STEP_MS)


def test_one_reading_per_second_of_meter_time_is_within_the_rate_rule() -> None:
    # docs/spec/reading-v1.md rule 9 as configured by default: at most 60 in any 60 s of meter time
    window = [plan.reading_ts(0, s) for s in range(1, 200)]
    densest = max(sum(1 for t in window if last - 60_000 < t <= last) for last in window)
    assert densest <= 60


def test_max_seq_bounds_the_round_robin_of_every_process() -> None:
    meters, processes, phases = 203, 2, [203, 5_000, 12_345]
    highest = 0
    sizes = [len(s) for s in plan.split([str(i) for i in range(meters)], processes)]
    seqs = [[0] * size for size in sizes]
    for total in phases:
        for p, count in enumerate(plan.share(total, processes)):
            for k in range(count):
                seqs[p][k % sizes[p]] += 1
                highest = max(highest, seqs[p][k % sizes[p]])
    assert highest <= max_seq(meters, processes, phases)


def test_token_bucket_follows_the_rate_and_catches_up_without_overshooting() -> None:
    assert plan.due(0.0, 1000, 0, 10_000) == 0
    assert plan.due(0.5, 1000, 0, 10_000) == 500
    assert plan.due(0.5, 1000, 500, 10_000) == 0
    assert plan.due(2.0, 1000, 500, 10_000) == 1_500  # a late tick catches up
    assert plan.due(99.0, 1000, 9_990, 10_000) == 10  # never past the total


def test_percentiles_are_nearest_rank() -> None:
    values = sorted(float(v) for v in range(1, 101))
    assert plan.percentile(values, 50) == 50.0
    assert plan.percentile(values, 99) == 99.0
    assert plan.percentile(values, 100) == 100.0
    assert plan.percentile([], 50) is None
    summary = plan.latency_summary([1.0, 2.0, 3.0])
    assert summary["p50"] == 2.0
    assert summary["max"] == 3.0
    assert summary["count"] == 3


def test_backlog_is_published_minus_receipted_and_its_growth_shows_overload() -> None:
    assert plan.add_series([[1, 2], [3]]) == [4, 2]
    assert plan.backlog_series([10, 10, 10], [5, 10, 15]) == [5, 5, 0]
    assert plan.backlog_series([10, 10], [0, 0, 20]) == [10, 20, 0]
    keeping_up = [100] * 20
    falling_behind = [100 + 50 * s for s in range(20)]
    assert plan.backlog_growth(keeping_up) == 0.0
    assert plan.backlog_growth(falling_behind) == pytest.approx(50.0)
    assert plan.backlog_growth([1, 2, 3]) == 0.0


def test_verdict_names_what_broke() -> None:
    def verdict(**given: int) -> plan.Verdict:
        healthy = {"offered_per_s": 1000, "published": 10_000, "expected": 10_000,
                   "growth_per_s": 3, "unreceipted": 0, "stored": 10_000}  # fmt: skip
        return plan.sustained(**{**healthy, **given})

    assert verdict().sustained
    slow_gen = verdict(published=9_000, stored=9_000)
    assert not slow_gen.sustained
    assert "generator" in slow_gen.why
    growing = verdict(growth_per_s=11)
    assert not growing.sustained
    assert "backlog" in growing.why
    assert not verdict(unreceipted=1).sustained


def test_a_tier_whose_readings_were_receipted_but_not_stored_was_not_sustained() -> None:
    """Rejections are receipted as quickly as acceptances: a tier whose readings all came
    back `rejected` (a clock skew, a rate rule) kept no backlog, yet ingest stored none."""
    rejected = plan.sustained(
        offered_per_s=1000, published=10_000, expected=10_000, growth_per_s=0, unreceipted=0,
        stored=9_999,
    )  # fmt: skip
    assert not rejected.sustained
    assert rejected.why == "only 9999 of 10000 published readings stored"


def test_connect_summary_adds_processes_up() -> None:
    answers = [
        {"meters": 3, "connected": 3, "started": 10.0, "finished": 11.0, "contexts_s": 0.1,
         "per_second": [2, 1], "per_broker": [1, 2], "errors": {}},
        {"meters": 3, "connected": 2, "started": 10.5, "finished": 12.0, "contexts_s": 0.2,
         "per_second": [2], "per_broker": [2, 0], "errors": {"ConnectionRefusedError": 1}},
    ]  # fmt: skip
    summary = connect_summary(answers)
    assert summary["connected"] == 5
    assert summary["seconds"] == 2.0
    assert summary["handshakes_per_s"] == 2.5
    assert summary["per_second"] == [4, 1]
    assert summary["per_broker"] == [3, 2]
    assert summary["errors"] == {"ConnectionRefusedError": 1}


def test_max_connections_is_read_from_the_tls_listener_only() -> None:
    conf = (
        "max_queued_messages 10\nlistener 8883 127.0.0.1\nprotocol mqtt\n"
        "# max_connections 5\nmax_connections 19000\n"
        "listener 1884 127.0.0.1\nmax_connections 16\n"
    )
    assert listener_max_connections(conf, 8883) == 19000
    assert listener_max_connections(conf, 1884) == 16
    assert listener_max_connections("listener 8883\n", 8883) is None


@pytest.mark.slow
def test_generator_processes_publish_and_match_every_receipt(
    pki: PkiLayout, broker: BrokerServer, stack_env: StackEnv, database_url: str, tmp_path: Path
) -> None:
    meters = [f"lg-{uuid.uuid4().hex[:8]}-{i}" for i in range(4)]
    for meter_id in meters:
        provision(pki, database_url, meter_id)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=stack_env.redis_url
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    worker.start()
    env = stack_env.model_copy(update={"database_url": database_url})
    ts_base = plan.ts_base_ms(int(time.time() * 1000), 10)
    gens = Generators(env=env, meter_ids=meters, processes=2, ts_base_ms=ts_base, run_dir=tmp_path)
    try:
        connected = gens.answers(timeout=60)
        assert sum(a["connected"] for a in connected) == 4
        prepared = gens.prepare(8, 40)
        assert sum(p["count"] for p in prepared) == 8
        gens.go(start_at=time.time() + 0.2, grace_s=20, tag="smoke/1", legs=True)
        done = gens.answers(timeout=60)
    finally:
        gens.stop()
        worker.stop()
    assert sum(d["published"] for d in done) == 8
    assert sum(d["statuses"].get("accepted", 0) for d in done) == 8
    assert sum(d["unreceipted"] for d in done) == 0
    assert sum(sum(d["receipted_per_second"]) for d in done) == 8
    latencies = array("f")
    for d in done:
        latencies.frombytes(Path(d["latencies_file"]).read_bytes())
    assert len(latencies) == 8
    assert all(v > 0 for v in latencies)
    assert sorted(stored_counts(database_url, meters)) == sorted(
        (m, s) for m in meters for s in (1, 2)
    )
    receipts: dict[str, list[Any]] = {"meter_id": [], "seq": [], "sent": [], "receipt": []}
    for d in done:
        for key, values in json.loads(Path(d["legs_file"]).read_text()).items():
            receipts[key] += values
    times = join_stored(database_url, receipts)
    # every reading found with its own row: the worker received, verified and stored it
    # between its send and its receipt, to the worker's whole milliseconds
    assert len(times) == 8
    for t in times:
        assert t.sent - 1 <= t.received <= t.verified <= t.stored <= t.receipt, t
    assert sorted(t.total for t in times) == pytest.approx(sorted(latencies), abs=0.01)


def test_a_tier_waits_for_the_followers_to_leave_and_says_so_when_they_do_not(
    pki: PkiLayout, broker: BrokerServer, stack_env: StackEnv, database_url: str, tmp_path: Path
) -> None:
    """A follower with thresholds that always say "join", and "leave" after 2.5 s of an idle
    group, read through its real /metrics: `settle` waits out its stay, and gives up at
    its timeout with the follower counted as still subscribed."""
    common = {"pki": pki, "port": broker.port, "database_url": database_url,
              "redis_url": stack_env.redis_url, "follow_tick_s": 0.1}  # fmt: skip
    anchor = worker_settings(**common, metrics_port=free_port())
    follower = worker_settings(
        **common, share_group=anchor.share_group, metrics_port=free_port(), follow_load=True,
        follow_join_busy=0.0, follow_leave_after_s=2.5,
    )  # fmt: skip
    workers = [
        WorkerProcess(s, tmp_path / f"worker-{i}.log") for i, s in enumerate([anchor, follower])
    ]
    ports = [follower.metrics_port]
    try:
        workers[0].start()
        workers[1].wait_for("broker_connected", workers[1].launch())  # it subscribes later
        wait_until(
            lambda: followers_subscribed(ports) == 1, within_s=30, every_s=0.05, what="joins"
        )
        waited = settle(ports, timeout_s=30)
        wait_until(
            lambda: followers_subscribed(ports) == 1, within_s=30, every_s=0.05, what="rejoins"
        )
        gave_up = settle(ports, timeout_s=0.5)
    finally:
        for worker in workers:
            if worker.proc is not None:
                worker.stop()
    assert waited["followers_at_start"] == 1
    assert waited["followers_subscribed"] == 0
    assert 1.5 <= waited["seconds"] < 30
    assert gave_up == {"seconds": pytest.approx(0.5, abs=0.4), "followers_at_start": 1,
                       "followers_subscribed": 1}  # fmt: skip
    assert settle([], timeout_s=30)["seconds"] == 0  # one worker: nobody to wait for


def test_the_search_halves_the_gap_above_the_highest_sustained_rate() -> None:
    given = [(1_000, True), (2_000, True), (5_000, True), (10_000, False)]
    assert plan.next_probe(given, 250) == 7_500
    assert plan.next_probe([*given, (7_500, False)], 250) == 6_250
    assert plan.next_probe([*given, (7_500, True)], 250) == 8_750
    # a failure below the best (noise) does not bound the search
    assert plan.next_probe([(1_000, False), (2_000, True), (4_000, False)], 500) == 3_000
    assert plan.next_probe([(5_000, True), (5_250, False)], 250) is None  # a step apart
    assert plan.next_probe([(5_000, True)], 250) is None  # nothing failed above
    assert plan.next_probe([(1_000, False)], 250) is None  # nothing sustained


def test_half_rate_is_measured_unless_it_was_already() -> None:
    assert plan.half_rate(6_250, [1_000, 2_000, 5_000, 10_000, 7_500, 6_250], 250) == 3_000
    assert plan.half_rate(4_000, [1_000, 2_000, 5_000], 250) is None  # 2,000 is half
    assert plan.half_rate(5_000, [1_000], 250) == 2_500
    assert plan.half_rate(400, [], 250) is None  # rounds to nothing


def test_a_live_profile_leaves_the_event_loops_epoll_waits_out() -> None:
    """Under live load py-spy counted a waiting event loop as busy; those samples are not
    charged to any stage when `skip_waits` is asked for."""
    lines = [
        "process 1;thread 1;run_forever (asyncio/base_events.py:1);"
        "EpollSelector.select (selectors.py:468) 90",
        "process 1;thread 1;verify_all (main/ingest/pipeline.py:40) 10",
    ]
    kept = attribute(lines, rate_hz=100, readings=10, workers=1, cpu_s=1.0, skip_waits=True)
    every = attribute(lines, rate_hz=100, readings=10, workers=1, cpu_s=1.0)
    assert kept.samples == 10
    assert every.samples == 100
    assert kept.total_us == pytest.approx(100_000)  # 1 s of CPU over 10 readings
    assert {s.stage: s.samples for s in kept.stages}["verify"] == 10


@pytest.mark.slow
def test_two_bench_stacks_started_at_once_each_get_ports_of_their_own(tmp_path: Path) -> None:
    """Two bench runs at once (two test processes, or two people on one machine): each
    private stack and its workers on free ports of their own, never the conventional ones
    a developer's stack may hold."""
    stacks = [
        BenchStack(tmp_path / name, meters=2, workers=2, progress=lambda _: None)
        for name in ("one", "two")
    ]
    # The pool ends (both starts done) before the stacks are stopped, even when one fails.
    with contextlib.ExitStack() as running, ThreadPoolExecutor(2) as pool:
        for entered in pool.map(lambda s: running.enter_context(s.running()), stacks):
            assert entered.worker_proc is not None
            assert entered.worker_proc.poll() is None
        envs = [s.env_required for s in stacks]
        ports = [
            {e.mqtt_port, e.mqtt_admin_port, _port(e.database_url), _port(e.redis_url)}
            | {s.metrics_base, *s.follower_ports}
            for s, e in zip(stacks, envs, strict=True)
        ]
    assert not ports[0] & ports[1], ports
    assert not (ports[0] | ports[1]) & {8883, 1884, 5432, 6379}, ports


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


@pytest.mark.slow
def test_with_the_bridge_a_load_run_claims_what_it_stores_and_counts_the_bridges_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bench load --bridge`: a real `meterproof bridge` beside the workers claims the
    stored readings into its open batch (every 0.2 s here, 5 s by default), and its
    process is a CPU group of its own. Without the bridge no row would ever be claimed."""
    monkeypatch.setenv("METERPROOF_CLAIM_INTERVAL_S", "0.2")
    figures = run_tiers(
        tmp_path, rates=[200], seconds_per_tier=2, meters=20, workers=1,
        progress=lambda _: None, bridge=True,
    )  # fmt: skip
    [tier] = figures["tiers"]
    assert figures["bridge"] is True
    assert tier["stored"] == tier["accepted"] == 400
    # the warmup's 20 and this tier's 400 are stored; the last 0.2 s may be unclaimed yet
    assert tier["unclaimed_at_end"] < 100, tier["unclaimed_at_end"]
    assert tier["legs_ms"]["count"] == 400  # every accepted reading's latency split
    assert "bridge" in tier["cpu"]["cores"]
    assert "bridge" in server_cost(tier)["us_per_reading"]


class _Bench:
    """What `measure` asks of a BenchStack, without a stack: one worker (no followers)."""

    follower_ports: tuple[int, ...] = ()

    def stored(self) -> int:
        return 0

    def unclaimed(self) -> int:
        return 0

    def cpu_groups(self, generators: object) -> dict[str, Any]:
        return {}


class _Generator:
    """Answers `go` `done_after_s` after its window ends, and until then blocks in `reply`
    for the timeout asked, as a GeneratorProcess does."""

    def __init__(self, run_dir: Path, name: str, done_after_s: float) -> None:
        self.latencies = run_dir / f"latency-{name}.f32"
        self.done_after_s = done_after_s
        self.done_at = 0.0

    def reply(self, timeout: float) -> dict[str, Any]:
        wait = self.done_at - time.time()
        if wait > timeout:
            time.sleep(timeout)
            raise TimeoutError
        time.sleep(max(0.0, wait))
        self.latencies.write_bytes(array("f", [5.0]).tobytes())
        return {
            "published": 1, "published_per_second": [1], "receipted_per_second": [1],
            "unreceipted": 0, "latencies_file": str(self.latencies), "statuses": {"accepted": 1},
            "reasons": {}, "publish_s": 1.0, "go": time.time(), "last_receipt": time.time(),
            "cpu_s": 0.0, "disconnects": 0, "connected": 1,
        }  # fmt: skip


class _Generators:
    def __init__(self, procs: list[_Generator], seconds: float) -> None:
        self.procs = procs
        self.seconds = seconds

    def prepare(self, total: int, rate: float) -> list[dict[str, Any]]:
        return [{"sign_s": 0.0} for _ in self.procs]

    def go(self, *, start_at: float, grace_s: float, tag: str, legs: bool = False) -> None:
        for g in self.procs:
            g.done_at = start_at + self.seconds + g.done_after_s

    def answers(self, timeout: float) -> list[dict[str, Any]]:
        return [g.reply(timeout) for g in self.procs]


def test_a_tiers_cpu_is_averaged_over_its_publishing_window_only(tmp_path: Path) -> None:
    """Generators answer only after their grace period; waiting a second on each of them
    in turn took the CPU summary up to a second per generator after the window ended, so
    the cores of a tier that kept up were averaged over idle time too."""
    seconds = 2.5
    gens = _Generators([_Generator(tmp_path, f"g{i}", 1.5) for i in range(2)], seconds)
    tier = measure(
        _Bench(), gens, rate=2 / seconds, seconds=seconds, tag="t",  # type: ignore[arg-type]
        progress=lambda _: None,
    )  # fmt: skip
    assert tier["cpu"]["seconds"] == pytest.approx(seconds, abs=0.25)


def test_generators_that_fail_to_start_leave_none_running(tmp_path: Path) -> None:
    """The second generator cannot start (its job file's path is a folder): the first,
    already started, is stopped, not left waiting for commands."""
    (tmp_path / "gen-1.json").mkdir()
    env = StackEnv(pki_root=tmp_path / "pki")
    with pytest.raises(IsADirectoryError):
        Generators(env=env, meter_ids=[], processes=2, ts_base_ms=0, run_dir=tmp_path)
    job = str(tmp_path / "gen-0.json")
    running = [
        p.pid
        for p in psutil.process_iter(["cmdline", "status"])
        if job in (p.info["cmdline"] or ()) and p.info["status"] != psutil.STATUS_ZOMBIE
    ]
    assert running == []
