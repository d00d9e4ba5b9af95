"""Sustained live load: rising tiers of readings/s from many connected meters, end to end.

Interface (stable; `meterproof bench load` and the report call it):

    run_tiers(run_dir: Path, *, rates: Sequence[int], seconds_per_tier: float, meters: int,
              workers: int, progress: Callable[[str], None]) -> dict[str, Any]

Everything runs on a private stack in `run_dir` (stopped afterwards): broker, PostgreSQL,
Redis, `meterproof ingest --workers N` with receipts and verified republish on, the
generator processes (`bench.loadgen`), and with `bridge` the ledger bridge (`meterproof
bridge` with its defaults: a claim every 5 s, 900 s epochs, the local ledger), all on this
machine. Each meter has its own device certificate and connection. Readings are signed
before a tier starts; a tier publishes them at the offered rate and times each one from
publish to its receipt.

Returned keys:
- `meters`, `workers`, `generators`, `seconds_per_tier`, `bridge`, `warmup` (one reading
  per meter first, so key caches are warm; a tier dict as below), `connect` (see
  `connect_summary`).
- `tiers`: one dict per rate, in order:
  `offered_per_s`, `seconds`, `expected`, `published`, `published_per_s` (what the
  generator really sent), `receipted_in_window_per_s` (receipts that arrived while
  publishing), `accepted`, `accepted_per_s` (receipts with status accepted divided by
  `receipt_span_s`, the time from the start to the last receipt: the offered rate while
  the pipeline keeps up, its capacity when it does not), `stored` (new `reading_log`
  rows in PostgreSQL), `unclaimed_at_end` (all rows no bridge batch holds, after the
  grace period), `statuses` and `reasons` (receipt counts), `unreceipted` (no
  receipt after the grace period), `latency_ms` (`p50`, `p95`, `p99`, `max`, `count`:
  publish -> receipt), `backlog` (`growth_per_s`, `end`, `max`, `series`: published -
  receipted, per second), `sustained` and `verdict` (see `bench.loadgen.plan.sustained`),
  `cpu` (`cores` per group - broker, postgres, redis, workers, bridge (with `bridge`),
  generator - where 1.0 is one core busy; `processes`; `machine_cores`; `rss_mib`;
  `rw_calls_per_s`, each group's read(2) and write(2) calls, see `bench.cpu`),
  `generator_cpu_s`, `sign_s`, `disconnects`, `connected`, `settled` (each tier starts
  once no load-following worker is subscribed: `seconds` waited, `followers_at_start`,
  `followers_subscribed` if the wait timed out; `bench.loadgen.control.settle`),
  `followers_at_end` (subscribed when the publishing window ended), `legs_ms` (the
  accepted readings' latency split where the worker received, verified and stored them:
  each leg's `p50`, `p99` and `slowest_mean` over the readings at or above the whole's
  `p99_ms`; `bench.loadgen.legs`), and `probe`:
  "given" (one of `rates`), "search" (chosen by `search_steps`: halfway between the
  highest sustained rate and the lowest unsustained one above it, on a `resolution`
  grid) or "half of the highest sustained" (measured when no tier is within half a step
  of it: the latency target is judged there).
- `max_sustained_per_s`: the highest offered rate whose tier was sustained (None if none).

With `profile`, PostgreSQL is restarted with `pg_stat_statements` before the workers start,
and each tier also carries `profile`: py-spy over the workers (`bench.profile`, the
event loops' epoll waits left out), its stages sharing out the workers' CPU of the
publishing window over the accepted readings; `libraries`, the same CPU shared out by
perf's samples of the workers over the shared objects they ran in
(`bench.profile.LIBRARIES`; None, with `libraries_unavailable` saying why, when perf is
missing or not permitted), which unlike py-spy leaves out time a thread waited for a core;
and `statements`, the top PostgreSQL statements of the tier by executor time (which
includes waiting for locks, and for a COPY the client's rows). Nested statements count
too (`pg_stat_statements.track = all`): a trigger's body and a foreign key's check appear
on their own lines, and their time is also inside the statement that fired them. How it
was read: docs/scaling.md, "Live path profile".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import psycopg

from meterproof.bench.cpu import process_tree
from meterproof.bench.loadgen import plan
from meterproof.bench.loadgen.control import BenchStack, Generators, measure
from meterproof.bench.profile import attribute, perf_record, py_spy

Progress = Callable[[str], None]

WARMUP_RATE = 2_000
PROFILE_HZ: Final = 200
PERF_HZ: Final = 499  # not a multiple of the kernel's tick, so not in step with it
_TOP_STATEMENTS: Final = """
SELECT calls, round(total_exec_time::numeric, 1), rows,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 300)
FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 20
"""


def _track_statements(bench: BenchStack) -> Callable[[str, list[str]], None]:
    """Before the workers start: PostgreSQL restarted with pg_stat_statements loaded."""

    def prepare(database_url: str, meter_ids: list[str]) -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        bench.stack.servers(bench.stack.recorded())[0].restart()
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
            conn.execute("SELECT pg_reload_conf()")

    return prepare


def _statements(database_url: str, *, reset: bool) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        if reset:
            conn.execute("SELECT pg_stat_statements_reset()")
            return []
        rows = conn.execute(_TOP_STATEMENTS).fetchall()
    return [
        {"calls": calls, "exec_ms": float(ms), "rows": n, "query": query}
        for calls, ms, n, query in rows
    ]


def max_seq(meters: int, processes: int, readings: Sequence[int]) -> int:
    """An upper bound of the seq any meter reaches over phases of `readings` each."""
    smallest = meters // processes
    return sum(plan.per_meter(-(-n // processes), smallest) for n in readings) + 1


def connect_summary(answers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Handshakes/s over the ramp: meters connected / (last CONNACK - first attempt);
    `contexts_s` is the time spent loading certificates before it."""
    connected = sum(a["connected"] for a in answers)
    began = min(a["started"] for a in answers)
    ended = max(a["finished"] for a in answers)
    errors: dict[str, int] = {}
    for a in answers:
        for kind, n in a["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    return {
        "meters": sum(a["meters"] for a in answers),
        "connected": connected,
        "seconds": round(ended - began, 2),
        "contexts_s": round(max(a["contexts_s"] for a in answers), 2),
        "handshakes_per_s": round(connected / max(ended - began, 1e-9), 1),
        "per_second": plan.add_series([a["per_second"] for a in answers]),
        "per_broker": plan.add_series([a["per_broker"] for a in answers]),
        "errors": errors,
    }


def run_tiers(
    run_dir: Path,
    *,
    rates: Sequence[int],
    seconds_per_tier: float,
    meters: int,
    workers: int,
    progress: Callable[[str], None],
    search_steps: int = 0,
    resolution: int = 250,
    prepare: Callable[[str, list[str]], None] | None = None,
    profile: bool = False,
    bridge: bool = False,
) -> dict[str, Any]:
    if not rates or min(rates) <= 0 or seconds_per_tier <= 0 or meters < 2 or workers < 1:
        raise ValueError("need rates > 0, seconds_per_tier > 0, meters >= 2, workers >= 1")
    if search_steps < 0 or resolution < 1:
        raise ValueError("need search_steps >= 0 and resolution >= 1")
    processes = plan.generator_count(meters)
    # the searched rates lie below the highest given one; the half-rate tier adds one more
    extra = [max(rates)] * (search_steps + (1 if search_steps else 0))
    phases = [meters, *(round(r * seconds_per_tier) for r in [*rates, *extra])]
    ts_base = plan.ts_base_ms(int(time.time() * 1000), max_seq(meters, processes, phases))
    stack = BenchStack(run_dir, meters=meters, workers=workers, progress=progress, bridge=bridge)
    track = _track_statements(stack) if profile else None

    def before_workers(database_url: str, meter_ids: list[str]) -> None:
        for step in (track, prepare):
            if step is not None:
                step(database_url, meter_ids)

    stack.prepare = before_workers
    with stack.running() as b:
        progress(f"connecting {meters:,} meters from {processes} generator processes")
        with Generators(
            env=b.env_required,
            meter_ids=b.meter_ids,
            processes=processes,
            ts_base_ms=ts_base,
            run_dir=run_dir,
        ) as gens:
            connect = connect_summary(gens.answers(timeout=600))
            progress(
                f"  {connect['connected']:,} connected in {connect['seconds']} s "
                f"({connect['handshakes_per_s']:,.0f} handshakes/s)"
            )
            warm_rate = min(WARMUP_RATE, meters)
            warmup = measure(
                b,
                gens,
                rate=warm_rate,
                seconds=meters / warm_rate,
                tag="warmup",
                progress=progress,
            )

            def tier(rate: int, probe: str) -> dict[str, Any]:
                if not profile:
                    t = measure(
                        b, gens, rate=rate, seconds=seconds_per_tier, tag=f"{rate}-per-s",
                        progress=progress, legs=True,
                    )  # fmt: skip
                    return {**t, "probe": probe}
                url = b.env_required.database_url
                _statements(url, reset=True)
                out = run_dir / f"py-spy-{rate}-per-s.txt"
                assert b.worker_proc is not None
                with (
                    py_spy(b.worker_proc.pid, out, rate_hz=PROFILE_HZ),
                    perf_record(
                        process_tree(b.worker_proc.pid),
                        run_dir / f"perf-{rate}-per-s.data",
                        rate_hz=PERF_HZ,
                    ) as perf,
                ):
                    t = measure(
                        b, gens, rate=rate, seconds=seconds_per_tier, tag=f"{rate}-per-s",
                        progress=progress, legs=True,
                    )  # fmt: skip
                cpu_s = t["cpu"]["cores"]["workers"] * seconds_per_tier
                readings = max(t["accepted"], 1)
                with out.open(encoding="utf-8") as lines:
                    stages = attribute(
                        lines,
                        rate_hz=PROFILE_HZ,
                        readings=readings,
                        workers=workers,
                        cpu_s=cpu_s,
                        skip_waits=True,
                    )
                found = {
                    **stages.as_dict(),
                    "libraries": perf.costs(cpu_s=cpu_s, readings=readings),
                    "libraries_unavailable": perf.error,
                    "statements": _statements(url, reset=False),
                }
                return {**t, "probe": probe, "profile": found}

            tiers = [tier(rate, "given") for rate in rates]
            for _ in range(search_steps):
                rate = plan.next_probe(
                    [(t["offered_per_s"], t["sustained"]) for t in tiers], resolution
                )
                if rate is None:
                    break
                tiers.append(tier(rate, "search"))
            held = [t["offered_per_s"] for t in tiers if t["sustained"]]
            half = (
                plan.half_rate(max(held), [t["offered_per_s"] for t in tiers], resolution)
                if search_steps and held
                else None
            )
            if half is not None:
                tiers.append(tier(half, "half of the highest sustained"))
    held = [t["offered_per_s"] for t in tiers if t["sustained"]]
    return {
        "meters": meters,
        "workers": workers,
        "generators": processes,
        "seconds_per_tier": seconds_per_tier,
        "bridge": bridge,
        "connect": connect,
        "warmup": warmup,
        "tiers": tiers,
        "max_sustained_per_s": max(held, default=None),
    }
