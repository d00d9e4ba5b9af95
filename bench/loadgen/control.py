"""The parent side of a load run: a private stack with ingest workers, the generator
processes, CPU accounting per process group, and one measured phase at a given rate."""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, LiteralString

import orjson
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from meterproof.bench.compare import BRIDGE
from meterproof.bench.cpu import CpuSampler, process_tree, server_groups
from meterproof.bench.loadgen import plan
from meterproof.bench.loadgen.legs import join_stored, slowest_legs, summarise
from meterproof.bench.stacks import (
    free_port_run,
    provision_meters,
    stop_workers,
    up_on_free_ports,
    wait_ready,
)
from meterproof.config import StackEnv
from meterproof.stack.process import end_child
from meterproof.stack.services import LocalStack

Progress = Callable[[str], None]


def _stream_lines(stream: IO[str], sink: queue.Queue[str]) -> None:
    for line in stream:
        sink.put(line)


class GeneratorProcess:
    """One `python -P -m meterproof.bench.loadgen job.json`, spoken to in JSON lines."""

    def __init__(self, job: dict[str, Any], run_dir: Path) -> None:
        self.name: str = job["name"]
        job_file = run_dir / f"{self.name}.json"
        job_file.write_text(json.dumps(job), encoding="utf-8")
        self._log = (run_dir / f"{self.name}.log").open("ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "meterproof.bench.loadgen", str(job_file)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                text=True,
            )
        except BaseException:
            self._log.close()
            raise
        assert self.proc.stdout is not None
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(
            target=_stream_lines, args=(self.proc.stdout, self._lines), daemon=True
        )
        self._reader.start()

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                answer: dict[str, Any] = json.loads(self._lines.get(timeout=0.5))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"generator {self.name} exited ({self.proc.returncode}); "
                        f"see {self._log.name}"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"generator {self.name}: no answer in {timeout} s") from None
                continue
            return answer

    def stop(self, *, at_once: bool = False) -> None:
        """Ask the process to close its meters' connections and exit; `at_once` terminates
        it instead (it reads the next command only after the tier in hand)."""
        if self.proc.poll() is None:
            if at_once:
                self.proc.terminate()
            else:
                with contextlib.suppress(OSError, ValueError):
                    self.send({"cmd": "stop"})
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._log.close()


class Generators:
    """The fleet split over generator processes; every call goes to all of them."""

    def __init__(
        self,
        *,
        env: StackEnv,
        meter_ids: Sequence[str],
        processes: int,
        ts_base_ms: int,
        run_dir: Path,
    ) -> None:
        """Starts them all, or none: those started before one that failed are stopped."""
        self.procs: list[GeneratorProcess] = []
        try:
            for i, ids in enumerate(plan.split(list(meter_ids), processes)):
                job = {
                    "name": f"gen-{i}",
                    "pki_root": str(env.pki_root),
                    "brokers": env.brokers(),
                    "ts_base_ms": ts_base_ms,
                    "out_dir": str(run_dir),
                    "meters": ids,
                }
                self.procs.append(GeneratorProcess(job, run_dir))
        except BaseException:
            self.stop(at_once=True)
            raise

    @property
    def pids(self) -> list[int]:
        return [g.proc.pid for g in self.procs]

    def answers(self, timeout: float) -> list[dict[str, Any]]:
        return [g.reply(timeout) for g in self.procs]

    def prepare(self, total: int, rate: float, timeout: float = 900) -> list[dict[str, Any]]:
        for g, count in zip(self.procs, plan.share(total, len(self.procs)), strict=True):
            g.send({"cmd": "prepare", "count": count, "rate": rate / len(self.procs)})
        return self.answers(timeout)

    def go(self, *, start_at: float, grace_s: float, tag: str, legs: bool = False) -> None:
        for g in self.procs:
            g.send(
                {"cmd": "go", "start_at": start_at, "grace_s": grace_s, "tag": tag, "legs": legs}
            )

    def stop(self, *, at_once: bool = False) -> None:
        for g in self.procs:
            g.stop(at_once=at_once)

    def __enter__(self) -> Generators:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """A run that ends by an error or a signal does not wait for the tier in hand."""
        self.stop(at_once=exc_type is not None)


class BenchStack:
    """A private stack (PKI, `brokers` brokers, PostgreSQL, Redis) in `run_dir`, `meters`
    registered device identities, and `meterproof ingest --workers N` running and ready
    (each worker subscribed on every broker); with `bridge`, `meterproof bridge` as well,
    with its defaults, claiming what the workers store as a deployment's bridge does."""

    def __init__(
        self,
        run_dir: Path,
        *,
        meters: int,
        workers: int,
        progress: Progress,
        prepare: Callable[[str, list[str]], None] | None = None,
        brokers: int = 1,
        bridge: bool = False,
    ) -> None:
        """`prepare(database_url, meter_ids)` runs before the workers start."""
        self.run_dir = run_dir
        self.bridge = bridge
        self.prepare = prepare
        self.workers = workers
        self.progress = progress
        self.meters = meters
        self.stack = LocalStack(
            run_dir=run_dir / "stack", pki_root=run_dir / "pki", brokers=brokers
        )
        self.env: StackEnv | None = None
        self.meter_ids: list[str] = []
        self.worker_proc: subprocess.Popen[bytes] | None = None
        self.bridge_proc: subprocess.Popen[bytes] | None = None
        self.metrics_base = 0

    @property
    def follower_ports(self) -> list[int]:
        """The followers' /metrics ports: `ingest --workers N` anchors the first worker and
        serves worker i on base + i (ingest/cli.py)."""
        return [self.metrics_base + i for i in range(1, self.workers)]

    @contextlib.contextmanager
    def running(self) -> Iterator[BenchStack]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o755)  # PostgreSQL runs as its own unprivileged user
        try:
            self.env = up_on_free_ports(self.stack, ingest_workers=self.workers)
            self.progress(f"issuing and registering {self.meters:,} meter identities")
            began = time.perf_counter()
            keys = provision_meters(self.stack.layout, self.env.database_url, self.meters)
            self.meter_ids = sorted(keys)
            if self.prepare is not None:
                self.prepare(self.env.database_url, self.meter_ids)
            self.progress(
                f"  {time.perf_counter() - began:.1f} s; starting {self.workers} worker(s)"
            )
            self._start_workers()
            if self.bridge:
                self._start_bridge()
            yield self
        finally:
            if self.bridge_proc is not None:
                end_child(self.bridge_proc, signal.SIGTERM, timeout=60)
            if self.worker_proc is not None:
                stop_workers(self.worker_proc)
            self.stack.down(purge=True)

    @property
    def env_required(self) -> StackEnv:
        if self.env is None:
            raise RuntimeError("the stack is not running")
        return self.env

    def _environ(self, metrics_port: int) -> dict[str, str]:
        assert self.env is not None
        environ = {**os.environ, **dict(line.split("=", 1) for line in self.env.to_env_lines())}
        environ["METERPROOF_METRICS_PORT"] = str(metrics_port)
        environ["METERPROOF_LOG_LEVEL"] = "WARNING"  # a line per batch would cost CPU here
        return environ

    def _command(self, args: Sequence[str], metrics_port: int, log: str) -> subprocess.Popen[bytes]:
        with (self.run_dir / log).open("ab") as sink:
            return subprocess.Popen(
                [sys.executable, "-P", "-m", "meterproof", *args],
                env=self._environ(metrics_port),
                stdout=sink,
                stderr=sink,
                start_new_session=True,  # a group of its own, for `stop_workers`
            )

    def _start_workers(self) -> None:
        base = self.metrics_base = free_port_run(self.workers)
        self.worker_proc = self._command(
            ["ingest", "--workers", str(self.workers)], base, "workers.log"
        )
        for i in range(self.workers):
            wait_ready(self.worker_proc, base + i, self.run_dir / "workers.log")
        time.sleep(0.5)  # the SUBACK of the shared subscription follows readiness

    def _start_bridge(self) -> None:
        port = free_port_run(1)
        self.bridge_proc = self._command(["bridge"], port, "bridge.log")
        wait_ready(self.bridge_proc, port, self.run_dir / "bridge.log")

    def stored(self) -> int:
        return self._count("SELECT count(*) FROM reading_log")

    def unclaimed(self) -> int:
        """Stored readings no bridge batch has claimed yet."""
        return self._count("SELECT count(*) FROM reading_log WHERE batch_id IS NULL")

    def _count(self, query: LiteralString) -> int:
        assert self.env is not None
        with psycopg.connect(self.env.database_url) as conn:
            row = conn.execute(query).fetchone()
        return int(row[0]) if row else 0

    def broker_pids(self) -> list[int | None]:
        """Each broker's pid, in `env.brokers()` order."""
        return [broker.pid() for broker in self.stack.brokers(self.env_required)]

    def cpu_groups(self, generators: Generators) -> dict[str, Callable[[], list[int]]]:
        bridge = self.bridge_proc
        ledger = {BRIDGE: lambda: process_tree(bridge.pid)} if bridge is not None else {}
        return {
            **server_groups(self.stack, self.env_required),
            "workers": lambda: process_tree(self.worker_proc.pid if self.worker_proc else None),
            **ledger,
            "generator": lambda: generators.pids,
        }


#: Longer than a follower's stay after the group went idle (follow_leave_after_s, 30 s).
SETTLE_TIMEOUT_S = 90.0


def followers_subscribed(ports: Sequence[int]) -> int:
    """How many of the workers serving /metrics on `ports` take a share of the readings."""
    subscribed = 0.0
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "meterproof_ingest_subscribed":
                subscribed += sum(s.value for s in family.samples)
    return round(subscribed)


def settle(ports: Sequence[int], *, timeout_s: float = SETTLE_TIMEOUT_S) -> dict[str, Any]:
    """Wait until no follower takes readings, so that every tier starts from the same
    state whatever ran before it: a follower that an overload brought in stays for its
    `follow_leave_after_s` after the group went idle, longer than a tier lasts
    (docs/scaling.md, "The tier the latency target is judged at runs after the
    overload"). Returns the seconds waited, and the followers still subscribed if
    `timeout_s` ran out first."""
    began = time.monotonic()
    subscribed = followers_subscribed(ports)
    at_start = subscribed
    while subscribed and time.monotonic() - began < timeout_s:
        time.sleep(0.2)
        subscribed = followers_subscribed(ports)
    return {
        "seconds": round(time.monotonic() - began, 1),
        "followers_at_start": at_start,
        "followers_subscribed": subscribed,
    }


def _settle(bench: BenchStack, tag: str, progress: Progress) -> dict[str, Any]:
    settled = settle(bench.follower_ports)
    if settled["followers_at_start"]:
        progress(
            f"  {tag}: waited {settled['seconds']} s for {settled['followers_at_start']} "
            f"follower(s) to leave; {settled['followers_subscribed']} still subscribed"
        )
    return settled


def measure(
    bench: BenchStack,
    gens: Generators,
    *,
    rate: float,
    seconds: float,
    tag: str,
    progress: Progress,
    grace_s: float = 30.0,
    legs: bool = False,
) -> dict[str, Any]:
    """Offer `rate` readings/s for `seconds`; everything a tier reports (see bench.load),
    with `legs` its latency split by `bench.loadgen.legs`."""
    expected = round(rate * seconds)
    settled = _settle(bench, tag, progress)
    prepared = gens.prepare(expected, rate)
    sampler = CpuSampler(bench.cpu_groups(gens))
    stored_before = bench.stored()
    start_at = time.time() + 1.0
    gens.go(start_at=start_at, grace_s=grace_s, tag=tag, legs=legs)
    time.sleep(max(0.0, start_at - time.time()))
    sampler.start()
    # The publishing window only, not the grace period: a generator answers after its
    # grace, so waiting for answers here would stretch the window over idle time.
    while (left := start_at + seconds - time.time()) > 0:
        time.sleep(min(1.0, left))
        sampler.sample()
    cpu = sampler.summary()
    at_end = followers_subscribed(bench.follower_ports)
    finished = gens.answers(timeout=math.inf)  # a generator that exits raises
    stored = bench.stored() - stored_before
    unclaimed = bench.unclaimed()
    published = sum(f["published"] for f in finished)
    pub_series = plan.add_series([f["published_per_second"] for f in finished])
    rec_series = plan.add_series([f["receipted_per_second"] for f in finished])
    backlog = plan.backlog_series(pub_series, rec_series)
    publishing = backlog[: max(1, round(seconds))]
    growth = plan.backlog_growth(publishing)
    unreceipted = sum(f["unreceipted"] for f in finished)
    verdict = plan.sustained(
        offered_per_s=rate,
        published=published,
        expected=expected,
        growth_per_s=growth,
        unreceipted=unreceipted,
        stored=stored,
    )
    latencies = _latencies(finished)
    split = _legs(bench.env_required.database_url, finished) if legs else None
    statuses, reasons = _counts(finished, "statuses"), _counts(finished, "reasons")
    publish_s = max(f["publish_s"] for f in finished)
    # accepted/s over the time it took to receipt them: the offered rate while keeping up,
    # the pipeline's capacity when overloaded (the backlog drains after publishing stops)
    go = min(f["go"] for f in finished)
    span_s = max(publish_s, max(f["last_receipt"] for f in finished) - go)
    in_window = sum(rec_series[: max(1, round(seconds))])
    result = {
        "offered_per_s": rate,
        "seconds": seconds,
        "expected": expected,
        "published": published,
        "published_per_s": round(published / publish_s, 1),
        "receipted_in_window_per_s": round(in_window / seconds, 1),
        "accepted": statuses.get("accepted", 0),
        "accepted_per_s": round(statuses.get("accepted", 0) / span_s, 1),
        "receipt_span_s": round(span_s, 2),
        "stored": stored,
        "unclaimed_at_end": unclaimed,
        "statuses": dict(statuses),
        "reasons": dict(reasons),
        "unreceipted": unreceipted,
        "latency_ms": plan.latency_summary(sorted(latencies)),
        "backlog": {
            "growth_per_s": round(growth, 1),
            "end": publishing[-1] if publishing else 0,
            "max": max(publishing, default=0),
            "series": backlog,
        },
        "sustained": verdict.sustained,
        "verdict": verdict.why,
        "cpu": cpu,
        "generator_cpu_s": round(sum(f["cpu_s"] for f in finished), 2),
        "sign_s": round(max(p["sign_s"] for p in prepared), 1),
        "disconnects": sum(f["disconnects"] for f in finished),
        "connected": sum(f["connected"] for f in finished),
        "settled": settled,
        "followers_at_end": at_end,
    }
    if split is not None:
        result["legs_ms"] = split
    lat = result["latency_ms"]
    progress(
        f"  {tag}: offered {rate:,.0f}/s, published {result['published_per_s']:,.0f}/s, "
        f"accepted {result['accepted_per_s']:,.0f}/s, p50/p95/p99 "
        f"{_ms(lat['p50'])}/{_ms(lat['p95'])}/{_ms(lat['p99'])} ms, backlog growth "
        f"{growth:,.0f}/s -> {'sustained' if verdict.sustained else verdict.why}; "
        f"{at_end} follower(s) subscribed at the window's end"
    )
    if split and split["count"]:
        progress(f"    {slowest_legs(split)}")
    return result


def _counts(finished: Sequence[dict[str, Any]], key: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for f in finished:
        counts.update(f[key])
    return counts


def _latencies(finished: Sequence[dict[str, Any]]) -> array[float]:
    latencies = array("f")
    for f in finished:
        path = Path(f["latencies_file"])
        latencies.frombytes(path.read_bytes())
        path.unlink()
    return latencies


def _legs(database_url: str, finished: Sequence[dict[str, Any]]) -> dict[str, Any]:
    receipts: dict[str, list[Any]] = {"meter_id": [], "seq": [], "sent": [], "receipt": []}
    for f in finished:
        path = Path(f["legs_file"])
        for key, values in orjson.loads(path.read_bytes()).items():
            receipts[key] += values
        path.unlink()
    return summarise(join_stored(database_url, receipts))


def _ms(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.1f}"
