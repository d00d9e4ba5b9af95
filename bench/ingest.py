"""Backlog drain: N pre-signed Ed25519 readings queued for the workers' persistent sessions,
then the workers started; readings stored and acknowledged per second, next to the rate at
which a count-only subscriber drains the very same backlog (a second share group gets the
same messages), measured in the same run on the same broker.

The drain's figures (rate, and CPU per reading of the workers and of the servers) count from
the moment every worker is ready (/readyz) to the last commit, as a live tier counts its
window only: the workers' start-up (imports, TLS, connects) is kept apart, in `ready_s` and
`startup_cpu_s`, and the readings already stored by then are left out of the rate."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg

from meterproof.bench.backlog import (
    count_only_drain,
    open_session,
    publish_backlog,
    signed_payloads,
)
from meterproof.bench.cpu import CpuSampler, Group, server_groups
from meterproof.bench.stacks import (
    free_port_run,
    provision_meters,
    stop_workers,
    up_on_free_ports,
    wait_ready,
)
from meterproof.certs import ingest_identity
from meterproof.certs.layout import PkiLayout
from meterproof.config import StackEnv
from meterproof.schemas.signatures import load_private_key
from meterproof.stack.services import LocalStack

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class DrainResult:
    readings: int
    meters: int
    workers: int
    publish_s: float
    count_only_s: float
    count_only_per_s: float
    #: seconds from starting the worker processes until every one was ready
    ready_s: float
    #: readings the first workers had stored by then: left out of the figures below
    stored_at_ready: int
    #: from every worker ready to the last commit
    drain_s: float
    #: (readings - stored_at_ready) / drain_s
    drain_per_s: float
    ratio_to_count_only: float
    #: the workers' CPU seconds over `drain_s`
    worker_cpu_s: float
    cpu_us_per_reading: float
    #: µs of CPU per reading by group over `drain_s`: broker, postgres and redis sampled as
    #: the live tiers sample them, workers as `cpu_us_per_reading`
    server_us_per_reading: dict[str, float]
    #: CPU seconds by group (as above) over `ready_s`, the start-up left out of the figures
    startup_cpu_s: dict[str, float]
    #: (seconds since the workers were started, readings stored), for throughput over time
    samples: list[tuple[float, int]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stored(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    row = conn.execute("SELECT count(*) FROM reading_log").fetchone()
    return int(row[0]) if row else 0


def _workers(env: StackEnv, workers: int, log: Path, metrics_port: int) -> subprocess.Popen[bytes]:
    """Worker i answers /readyz on `metrics_port` + i."""
    environ = {**os.environ, **dict(line.split("=", 1) for line in env.to_env_lines())}
    environ["METERPROOF_METRICS_PORT"] = str(metrics_port)
    environ["METERPROOF_LOG_LEVEL"] = "WARNING"  # one line per batch would cost CPU here
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-P", "-m", "meterproof", "ingest", "--workers", str(workers)],
            env=environ, stdout=sink, stderr=sink,
            start_new_session=True,  # a group of its own, for `stop_workers`
        )  # fmt: skip


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) from /proc/<pid>/stat, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants so far."""
    stats = {
        int(p.name): stat
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and (stat := _proc_stat(int(p.name))) is not None
    }
    tree, grew = {pid}, True
    while grew:
        children = {child for child, (parent, _) in stats.items() if parent in tree}
        grew = not children <= tree
        tree |= children
    return sum(stats[p][1] for p in tree if p in stats)


@dataclass(frozen=True, slots=True)
class _Mark:
    """Readings stored and CPU seconds by group (servers and workers) at one moment."""

    stored: int
    cpu_s: dict[str, float]


def _mark(
    proc: subprocess.Popen[bytes], conn: psycopg.Connection[tuple[Any, ...]], servers: CpuSampler
) -> _Mark:
    servers.sample()
    return _Mark(_stored(conn), {**servers.cpu_seconds(), "workers": _tree_cpu_s(proc.pid)})


def _wait_stored(
    proc: subprocess.Popen[bytes],
    conn: psycopg.Connection[tuple[Any, ...]],
    total: int,
    started: float,
    *,
    log: Path,
    progress: Progress,
    tick: Callable[[], None],
) -> list[tuple[float, int]]:
    """Poll the stored count until it reaches `total`, calling `tick` at every poll; the
    samples make the throughput curve."""
    samples = [(0.0, 0)]
    last_report = started
    while (stored := _stored(conn)) < total:
        tick()
        now = time.perf_counter()
        samples.append((now - started, stored))
        if proc.poll() is not None:
            raise RuntimeError(f"workers exited with {proc.returncode}; see {log}")
        if now - last_report > 2:
            progress(f"  stored {stored:,} / {total:,}")
            last_report = now
        if now - started > 900:
            raise TimeoutError(f"only {stored} of {total} stored after 900 s")
        time.sleep(0.2)
    samples.append((time.perf_counter() - started, stored))
    return samples


def _timed_drain(
    env: StackEnv,
    workers: int,
    poll: psycopg.Connection[tuple[Any, ...]],
    groups: dict[str, Group],
    total: int,
    *,
    log: Path,
    progress: Progress,
    observe: Callable[[int], AbstractContextManager[object]],
) -> tuple[float, _Mark, _Mark, list[tuple[float, int]]]:
    """Start the workers and wait until `total` readings are stored; stop them. Returns the
    seconds until every worker was ready, what was stored and spent by then and at the end,
    and the stored count sampled from the start."""
    base = free_port_run(workers)
    servers = CpuSampler(groups)
    servers.start()
    started = time.perf_counter()
    proc = _workers(env, workers, log, base)
    try:
        with observe(proc.pid):
            for i in range(workers):
                wait_ready(proc, base + i, log, poll_s=0.05)
            ready_s, ready = time.perf_counter() - started, _mark(proc, poll, servers)
            samples = _wait_stored(
                proc, poll, total, started, log=log, progress=progress, tick=servers.sample
            )
            return ready_s, ready, _mark(proc, poll, servers), samples  # before the SIGTERM
    finally:
        stop_workers(proc)


def run_drain(
    *,
    run_dir: Path,
    readings: int = 200_000,
    meters: int = 50,
    workers: int = 2,
    progress: Progress = print,
    observe: Callable[[int], AbstractContextManager[object]] = lambda pid: nullcontext(),
    prepare: Callable[[str, list[str]], None] | None = None,
) -> DrainResult:
    """Everything on a private stack in `run_dir`, stopped afterwards.

    `prepare(database_url, meter_ids)` runs once the fleet is registered, before any
    worker starts (the consent benchmark puts its consents in place there).

    `observe(pid)` wraps the drain once the workers' supervisor `pid` is started (the
    profile attaches py-spy there); it ends when every reading is stored."""
    stack = LocalStack(run_dir=run_dir / "stack", pki_root=run_dir / "pki")
    # ingest-0 .. ingest-<workers-1> for the workers, one more for the count-only receiver
    env = up_on_free_ports(stack, ingest_workers=workers + 1)
    pki = PkiLayout(run_dir / "pki")
    try:
        per_meter = readings // meters
        total = per_meter * meters
        progress(f"registering {meters} meters, signing {total:,} readings")
        keys = provision_meters(pki, env.database_url, meters)
        if prepare is not None:
            prepare(env.database_url, list(keys))
        t0 = int(time.time() * 1000) - per_meter * 5_000 - 60_000
        backlogs = {
            m: signed_payloads(m, load_private_key("EdDSA", k), per_meter, t0_ms=t0)
            for m, k in keys.items()
        }
        counter = ingest_identity(workers)
        sessions = {counter: "$share/count/meters/+/readings"} | {
            ingest_identity(i): f"$share/{env.share_group}/meters/+/readings"
            for i in range(workers)
        }
        for name, topic in sessions.items():
            identity = pki.service(name)
            asyncio.run(open_session(pki, env.mqtt_port, identity, client_id=name, topic=topic))
        progress(f"publishing the backlog ({total:,} messages, QoS 1, {meters} meter identities)")
        published = publish_backlog(pki, env.mqtt_port, backlogs)
        progress(f"  queued in {published.seconds:.1f} s; count-only drain of the same backlog")
        count_s = asyncio.run(
            count_only_drain(pki, env.mqtt_port, pki.service(counter), client_id=counter,
                             expected=total, on_progress=lambda n: progress(f"  counted {n:,}"))
        )  # fmt: skip
        progress(f"  {total / count_s:,.0f} msg/s; starting {workers} worker process(es)")
        poll = psycopg.connect(env.database_url, autocommit=True)
        groups = server_groups(stack, env)
        postgres = groups["postgres"]
        # the poll's backend counts rows for the harness, not for the pipeline
        poller = poll.info.backend_pid
        groups["postgres"] = lambda: [p for p in postgres() if p != poller]
        proc_log = run_dir / "workers.log"
        with poll:
            ready_s, ready, end, samples = _timed_drain(
                env, workers, poll, groups, total, log=proc_log, progress=progress,
                observe=observe,
            )  # fmt: skip
        drained, drain_s = total - ready.stored, samples[-1][0] - ready_s
        if drained <= 0 or drain_s <= 0:
            raise RuntimeError(
                f"all {total:,} readings were stored before the workers were ready: "
                "give a larger backlog"
            )
        window = {g: s - ready.cpu_s[g] for g, s in end.cpu_s.items()}
        return DrainResult(
            readings=total, meters=meters, workers=workers, publish_s=published.seconds,
            count_only_s=count_s, count_only_per_s=total / count_s, ready_s=round(ready_s, 3),
            stored_at_ready=ready.stored, drain_s=drain_s, drain_per_s=drained / drain_s,
            ratio_to_count_only=(drained / drain_s) / (total / count_s),
            worker_cpu_s=window["workers"], cpu_us_per_reading=window["workers"] * 1e6 / drained,
            server_us_per_reading={g: round(s * 1e6 / drained, 1) for g, s in window.items()},
            startup_cpu_s={g: round(s, 3) for g, s in ready.cpu_s.items()},
            samples=[(round(t, 3), n) for t, n in samples],
        )  # fmt: skip
    finally:
        stack.down(purge=True)
