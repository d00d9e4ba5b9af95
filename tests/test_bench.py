"""The benchmark's pure helpers: rates from samples, percentiles, verdicts, the py-spy stage
rules, and the report rendered from sample JSON (never a timed test: speed is measured by
`meterproof bench`, not asserted here)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meterproof.bench import report
from meterproof.bench.cpu import CpuSampler
from meterproof.bench.loadgen.legs import Times, summarise
from meterproof.bench.machine import describe
from meterproof.bench.profile import attribute, classify, frames_of, library_costs, perf_record
from meterproof.bench.sampling import at_least, at_most, below, percentile, rates

MACHINE = {
    "date": "2026-11-23 04:00 UTC",
    "cpu": "Test CPU",
    "cores": "2",
    "memory": "1.0 GiB",
    "os": "Linux",
    "python": "3.11.7",
    "mosquitto": "mosquitto version 2.0.11",
    "postgresql": "postgres 15",
    "redis": "Redis 7",
    "meterproof": "0.1.0",
    "pynacl": "1.6.2",
    "gmqtt": "0.8.0",
}


def test_rates_use_windows_of_at_least_the_given_length():
    samples = [(0.0, 0), (0.2, 100), (0.9, 400), (1.0, 500), (1.5, 600), (2.5, 2500)]
    assert rates(samples, window_s=1.0) == [(1.0, 500.0), (2.5, 1333.3333333333333)]
    assert rates([], window_s=1.0) == []
    with pytest.raises(ValueError, match="window_s"):
        rates(samples, window_s=0)


def test_percentile_is_a_measured_value():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 99) == 5.0
    assert percentile(values, 0) == 1.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_verdicts_ratio_above_one_means_better():
    assert at_least(11_000, 22_000).met is False
    assert at_least(11_000, 22_000).ratio == 0.5
    assert at_most(1.5, 2.0).met is True
    assert at_most(4.0, 2.0).ratio == 0.5
    assert at_most(0.0, 2.0).ratio == math.inf


def test_each_verdict_compares_as_its_targets_label_says():
    """ "<= 150 µs" and "within 2x" are met at the target itself; "< 50 ms" is not."""
    assert at_most(150.0, 150.0).met is True
    assert at_most(2.0, 2.0).met is True
    assert below(50.0, 50.0).met is False
    assert below(49.9, 50.0).met is True
    assert below(4.0, 2.0).ratio == 0.5


@pytest.mark.parametrize(
    ("stack", "stage"),
    [
        (
            "run (ingest/worker.py:150);_process (ingest/worker.py:210);"
            "verify (ingest/verify.py:80);b64url_decode (schemas/reading.py:30)",
            "verify",
        ),
        (
            "_process (ingest/worker.py:200);decode (ingest/decode.py:35);"
            "decode_reading (schemas/codec.py:40);model_validate (pydantic/main.py:500)",
            "decode",
        ),
        (
            "_process (ingest/worker.py:230);commit_batch (ingest/store.py:130);"
            "_judge (ingest/store.py:160);judge (ingest/judge.py:90)",
            "judge (rules 7-9)",
        ),
        (
            "_process (ingest/worker.py:230);commit_batch (ingest/store.py:130);"
            "execute (psycopg/cursor_async.py:90);wait (psycopg/waiting.py:10)",
            "store",
        ),
        (
            "_run_once (asyncio/base_events.py:1922);_run (asyncio/events.py:80);"
            "MqttPackageHandler.__handle_publish_callback (gmqtt/mqtt/handler.py:567);"
            "MqttPackageHandler._send_puback (gmqtt/mqtt/handler.py:258);"
            "write (asyncio/sslproto.py:220)",
            "acknowledge",
        ),
        (
            "_process (ingest/worker.py:240);_announce (ingest/worker.py:270);"
            "MqttSource.publish (ingest/source.py:150);publish (gmqtt/client.py:300);"
            "write (asyncio/sslproto.py:220)",
            "publish",
        ),
        (
            "_run_once (asyncio/base_events.py:1922);_read_ready (asyncio/selector_events.py:800);"
            "data_received (asyncio/sslproto.py:300);read (ssl.py:1100)",
            "receive",
        ),
        (
            "_process (ingest/worker.py:230);lookup (ingest/replay.py:70);"
            "execute_command (redis/asyncio/client.py:600)",
            "replay check",
        ),
        (
            "<module> (cli/__main__.py:3);_find_and_load (<frozen importlib._bootstrap>:1)",
            "startup",
        ),
        ("_run_once (asyncio/base_events.py:1900)", "event loop + other"),
        (
            "_read_packet (gmqtt/mqtt/protocol.py:1);MqttSource._on_publish (ingest/source.py:2);"
            "parse_publish (ingest/source.py:3)",
            "receive",
        ),
        (
            "Worker._commit (ingest/worker.py:1);MqttSource.ack (ingest/source.py:2);"
            "MqttSource._transport_write (ingest/source.py:3);write (asyncio/sslproto.py:4)",
            "acknowledge",
        ),
        (
            "Worker._commit (ingest/worker.py:1);MqttSource.publish_many (ingest/source.py:2);"
            "MqttSource._transport_write (ingest/source.py:3)",
            "publish",
        ),
    ],
)
def test_stacks_go_to_the_stage_of_their_deepest_naming_frame(stack, stage):
    assert classify(stack.split(";")) == stage


def test_profile_attribution_converts_samples_to_microseconds_per_reading():
    lines = [
        'process 7:"python -m meterproof ingest";_process (ingest/worker.py:1);'
        "verify (ingest/verify.py:2) 30",
        "_process (ingest/worker.py:1);decode (ingest/decode.py:3) 10",
        "<module> (x.py:1);_find_and_load (<frozen importlib._bootstrap>:1) 50",
        "not a profile line",
    ]
    assert frames_of(lines[0]) == (
        ["_process (ingest/worker.py:1)", "verify (ingest/verify.py:2)"],
        30,
    )
    profile = attribute(lines, rate_hz=100, readings=1_000, workers=1)
    costs = {s.stage: s.us_per_reading for s in profile.stages}
    assert costs["verify"] == pytest.approx(300.0)  # 30 samples x 10 ms / 1,000 readings
    assert costs["decode"] == pytest.approx(100.0)
    assert profile.startup_samples == 50
    assert profile.total_us == pytest.approx(400.0)
    # scaled to measured CPU: 90 samples share 0.18 s, 2 ms each
    scaled = attribute(lines, rate_hz=100, readings=1_000, workers=1, cpu_s=0.18)
    assert {s.stage: s.us_per_reading for s in scaled.stages}["verify"] == pytest.approx(60.0)


def test_library_costs_share_out_cpu_by_perfs_shared_objects():
    report_text = """
    54.00%  libpython3.11.so.1.0
    23.00%  _sodium.abi3.so
    10.00%  [kernel.kallsyms]
     1.00%  libcrypto.so.3
     1.00%  libssl.so.3
     1.00%  _psycopg.cpython-311-x86_64-linux-gnu.so
    10.00%  libfoo.so
"""
    # 2 s of CPU over 10,000 readings: 200 µs a reading, shared out by the percentages
    costs = library_costs(report_text, cpu_s=2.0, readings=10_000)
    assert costs == {
        "interpreter": 108.0,
        "libsodium (signatures)": 46.0,
        "kernel": 20.0,
        "other": 20.0,
        "OpenSSL (TLS)": 4.0,
        "psycopg + libpq": 2.0,
    }
    assert next(iter(costs)) == "interpreter"  # largest first


_VERIFYING = """
import os, time
import nacl.bindings as b
from nacl.signing import SigningKey
key = SigningKey.generate()
signed = key.sign(os.urandom(200))
end = time.monotonic() + 3
while time.monotonic() < end:
    b.crypto_sign_open(bytes(signed), bytes(key.verify_key))
"""


def test_perf_record_finds_where_a_real_process_spends_its_cpu(tmp_path):
    """A process that checks signatures for 3 s: perf puts most of its CPU in libsodium."""
    if shutil.which("perf") is None:
        pytest.skip("perf is not installed (an optional tool: Debian's linux-perf)")
    busy = subprocess.Popen([sys.executable, "-c", _VERIFYING])
    try:
        time.sleep(0.5)  # past the imports
        with perf_record([busy.pid], tmp_path / "perf.data", rate_hz=499) as run:
            time.sleep(2)
    finally:
        busy.wait(10)
    costs = run.costs(cpu_s=2.0, readings=1)
    assert run.error is None, run.error
    assert costs is not None
    assert max(costs, key=costs.__getitem__) == "libsodium (signatures)"
    assert costs["libsodium (signatures)"] > 0.6 * sum(costs.values())


_WRITING = """
import os, sys
out = os.open(os.devnull, os.O_WRONLY)
for _ in range(300):
    os.write(out, b"x")
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
for _ in range(500):
    os.write(out, b"x")
sys.stdout.write("done\\n"); sys.stdout.flush()
sys.stdin.readline()
"""


def test_the_sampler_counts_a_process_write_calls_from_its_start_only():
    """A real process writes 300 times before the sampler starts and 500 after: only the
    500 (and its one line to us) count."""
    with subprocess.Popen(
        [sys.executable, "-c", _WRITING], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        assert child.stdin is not None
        try:
            assert child.stdout.readline() == "ready\n"
            sampler = CpuSampler({"writer": lambda: [child.pid]})
            sampler.start()
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline() == "done\n"
            summary = sampler.summary()
            reads, writes = sampler.rw_calls()["writer"]
        finally:
            child.kill()
    assert 501 <= writes <= 505, writes
    assert reads >= 1  # the line it waited for
    assert summary["rw_calls_per_s"]["writer"]["write"] > 0


def test_perf_record_says_why_without_perf(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no perf there
    with perf_record([1], tmp_path / "perf.data", rate_hz=99) as run:
        pass
    assert run.costs(cpu_s=1.0, readings=1) is None
    assert run.error is not None
    assert "perf not found" in run.error


def _write(results: Path, suite: str, figures: dict[str, object]) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{suite}-20261123T040000Z.json").write_text(
        json.dumps({"suite": suite, "machine": MACHINE, "figures": figures})
    )


def _drain_run(workers: int, per_s: float, count_only: float) -> dict[str, object]:
    return {
        "readings": 20_000, "meters": 50, "workers": workers, "publish_s": 2.0,
        "count_only_s": 20_000 / count_only, "count_only_per_s": count_only,
        "drain_s": 20_000 / per_s, "drain_per_s": per_s, "ratio_to_count_only": per_s / count_only,
        "samples": [[0.0, 0], [1.0, 5_000], [2.0, 11_000], [3.0, 20_000]],
    }  # fmt: skip


def test_report_shows_only_measured_suites_and_the_targets_they_decide(tmp_path):
    results, out = tmp_path / "results", tmp_path / "docs" / "benchmarks.md"
    _write(
        results, "ingest", {"runs": [_drain_run(1, 4_000, 50_000), _drain_run(2, 30_000, 50_000)]}
    )
    _write(
        results,
        "registration",
        {
            "meters": 1_000, "commands_issue_s": 1.5, "commands_register_s": 0.9,
            "commands_total_s": 2.4, "inprocess_issue_s": 0.7, "inprocess_csv_s": 0.05,
            "inprocess_register_s": 0.1, "inprocess_total_s": 0.85, "registered": 2_000,
        },
    )  # fmt: skip
    report.render(results, out)
    text = out.read_text()
    rows = {
        line.split(" | ")[0].lstrip("| "): line
        for line in text.splitlines()
        if line.startswith("| ")
    }
    assert "30,000/s (2 workers)" in rows["backlog drain >= 22,000 verified readings/s"]
    assert "| yes | 1.36 |" in rows["backlog drain >= 22,000 verified readings/s"]
    assert (
        "| 60% of 50,000/s | yes |" in rows["backlog drain >= 50% of the count-only receive rate"]
    )
    assert "**no** | 0.83" in rows["1,000 registrations (certificates + registry rows) < 2 s"]
    # suites that never ran leave no section and no target row behind
    assert "Sustained load" not in text
    assert "Limits of this machine" not in text
    assert "validation" not in text.lower()
    assert (out.parent / "img" / "bench-throughput.png").stat().st_size > 0
    assert (out.parent / "img" / "bench-scaling.png").stat().st_size > 0
    assert not (out.parent / "img" / "bench-latency.png").exists()


def _tier(offered: int, accepted: float, *, sustained: bool, cores: dict[str, float]) -> dict:
    return {
        "offered_per_s": offered, "published_per_s": offered, "accepted_per_s": accepted,
        "sustained": sustained, "latency_ms": {"p50": 20.0, "p95": 30.0, "p99": 40.0},
        "cpu": {"cores": cores},
    }  # fmt: skip


def _load_run(max_sustained: int, tiers: list[dict], **more: object) -> dict[str, object]:
    """The figures of a `bench load` run of 2,000 meters, 2 generators and 2 workers."""
    return {
        "meters": 2_000, "generators": 2, "seconds_per_tier": 15.0, "workers": 2,
        "max_sustained_per_s": max_sustained, "tiers": tiers, **more,
    }  # fmt: skip


def test_issue_17_rows_set_the_servers_cpu_per_reading_against_the_drains(tmp_path):
    results, out = tmp_path / "results", tmp_path / "docs" / "benchmarks.md"
    drain = {
        **_drain_run(2, 10_000, 50_000),
        "server_us_per_reading": {"broker": 20.0, "postgres": 60.0, "redis": 5.0, "workers": 115.0},
    }
    _write(results, "ingest", {"runs": [_drain_run(1, 5_000, 50_000), drain]})
    server = {"broker": 0.1, "postgres": 0.2, "redis": 0.02, "workers": 0.38}  # 700 µs at 1,000/s
    _write(
        results,
        "load",
        _load_run(4_000, [
            _tier(1_000, 1_000, sustained=True, cores={**server, "generator": 0.2}),
            _tier(2_000, 2_000, sustained=True, cores={
                "broker": 0.1, "postgres": 0.3, "redis": 0.02, "workers": 0.38,
                "generator": 0.3,
            }),  # 400 µs
            _tier(4_000, 4_000, sustained=True, cores={
                "broker": 0.2, "postgres": 0.4, "redis": 0.04, "workers": 0.56,
                "generator": 0.5,
            }),  # 300 µs: workers 140, postgres 100, broker 50, redis 10
            _tier(8_000, 5_000, sustained=False, cores={
                "broker": 0.2, "postgres": 0.4, "redis": 0.04, "workers": 0.56,
                "generator": 0.5,
            }),
        ]),
    )  # fmt: skip
    report.render(results, out)
    text = out.read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()}
    top = rows[
        "server CPU (workers + PostgreSQL + broker + Redis) per accepted reading at the highest "
        "sustained tier <= 150 µs (issue 17)"
    ]
    assert (
        "300 µs at 4,000/s (workers 140, postgres 100, broker 50, redis 10) | **no** | 0.50" in top
    )
    trickle = rows[
        "server CPU per reading at 1,000/s and 2,000/s within 2x of the backlog drain's (issue 17)"
    ]
    # against the drain's 200 µs: 1,000/s costs 3.5x, 2,000/s 2.0x; the worse decides
    assert "700 µs at 1,000/s (3.5x), 400 µs at 2,000/s (2.0x); drain 200 µs" in trickle
    assert "| **no** | 0.57 |" in trickle
    assert "compares with 200 µs per reading in the backlog drain with 2 workers" in text
    assert "No ledger bridge ran (as in the backlog drain)" in text
    assert "| 200 (workers 115, postgres 60, broker 20, redis 5) |" in text


def test_drains_that_did_not_measure_the_servers_leave_the_trickle_row_out(tmp_path):
    results, out = tmp_path / "results", tmp_path / "docs" / "benchmarks.md"
    _write(results, "ingest", {"runs": [_drain_run(2, 10_000, 50_000)]})
    _write(
        results,
        "load",
        _load_run(1_000, [
            _tier(1_000, 1_000, sustained=True, cores={"workers": 0.3, "generator": 0.2}),
        ]),
    )  # fmt: skip
    report.render(results, out)
    text = out.read_text()
    assert "within 2x of the backlog drain's" not in text
    assert "300 µs at 1,000/s (workers 300, postgres 0, broker 0, redis 0)" in text


def test_a_load_run_with_the_bridge_counts_it_on_the_servers_side(tmp_path):
    results, out = tmp_path / "results", tmp_path / "docs" / "benchmarks.md"
    cores = {"broker": 0.1, "postgres": 0.2, "redis": 0.02, "workers": 0.38, "bridge": 0.05}
    _write(
        results,
        "load",
        _load_run(
            1_000, [_tier(1_000, 1_000, sustained=True, cores={**cores, "generator": 0.2})],
            bridge=True,
        ),
    )  # fmt: skip
    report.render(results, out)
    text = out.read_text()
    assert (
        "| server CPU (workers + PostgreSQL + broker + Redis + bridge) per accepted reading at "
        "the highest sustained tier <= 150 µs (issue 17) | 750 µs at 1,000/s (workers 380, "
        "postgres 200, broker 100, bridge 50, redis 20) |"
    ) in text
    assert "The ledger bridge ran beside the workers with its defaults" in text
    assert "No ledger bridge ran" not in text


def test_the_load_report_gives_the_brokers_calls_per_reading_where_they_were_counted(tmp_path):
    results, out = tmp_path / "results", tmp_path / "docs" / "benchmarks.md"
    cores = {"broker": 0.1, "postgres": 0.2, "redis": 0.02, "workers": 0.38, "generator": 0.2}
    counted = _tier(2_000, 2_000, sustained=True, cores=cores)
    counted["cpu"]["rw_calls_per_s"] = {
        "broker": {"read": 8_200.0, "write": 10_000.0},
        "generator": {"read": 4_000.0, "write": 4_000.0},
    }
    older = _tier(1_000, 1_000, sustained=True, cores=cores)  # a tier without the counts
    _write(results, "load", _load_run(2_000, [older, counted]))
    report.render(results, out)
    calls = "The broker's read + write calls per accepted reading (one write per packet, as "
    assert calls + "Mosquitto sends them): 2,000/s 4.1 + 5.0 (docs/scaling.md" in out.read_text()


def test_the_load_report_splits_each_tiers_latency_into_its_legs(tmp_path):
    results, out = tmp_path / "results", tmp_path / "docs" / "benchmarks.md"
    cores = {"broker": 0.1, "postgres": 0.2, "redis": 0.02, "workers": 0.38, "generator": 0.2}
    split = _tier(2_000, 2_000, sustained=True, cores=cores)
    split["legs_ms"] = summarise([Times(0, 2, 12, 15, 25)] * 197 + [Times(0, 3, 53, 58, 70)] * 3)
    older = _tier(1_000, 1_000, sustained=True, cores=cores)  # a tier without the legs
    _write(results, "load", _load_run(2_000, [older, split]))
    report.render(results, out)
    text = out.read_text()
    assert "| offered /s | p99 | to the worker | in the batch | to the transaction | " in text
    assert "| 2,000 | 70 | 2.0 / 3.0 | 10.0 / 50.0 | 3.0 / 5.0 | 10.0 / 12.0 |" in text
    assert "| 1,000 | " not in text.split("Where the time to a receipt goes")[1].split("\n\n")[1]


def test_the_slowest_readings_legs_are_averaged_over_those_at_or_above_the_p99():
    fast, slow = Times(0, 2, 12, 15, 25), Times(0, 3, 53, 58, 70)
    assert fast.legs() == (2, 10, 3, 10)
    assert sum(slow.legs()) == slow.total == 70
    split = summarise([fast] * 197 + [slow] * 3)
    assert (split["count"], split["slowest"], split["p99_ms"]) == (200, 3, 70)
    assert split["legs"]["in the batch"] == {"p50": 10.0, "p99": 50.0, "slowest_mean": 50.0}
    # with one slow reading in 200 the p99 (the 198th) is a fast one's: all 200 count
    assert summarise([fast] * 199 + [slow])["legs"]["in the batch"]["slowest_mean"] == 10.2
    assert summarise([]) == {"count": 0}


def test_the_machine_header_names_the_postgres_the_stack_runs(tmp_path, monkeypatch):
    """Not a fixed /usr/lib/postgresql/15: the stack takes `postgres` from PATH first, then
    Debian's highest major (stack.postgres.pg_bin)."""
    fake = tmp_path / "postgres"
    fake.write_text("#!/bin/sh\necho 'postgres (PostgreSQL) 99.1'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert describe()["postgresql"] == "postgres (PostgreSQL) 99.1"


def test_the_machine_header_counts_the_cores_the_bench_may_use():
    """The report divides by `cores` ("N cores give at most ..."): in a container limited
    to a cpuset that is the cpuset, not the host's CPU count."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        cores = describe()["cores"]
    finally:
        os.sched_setaffinity(0, before)
    assert cores == "1"
