"""Where a reading's CPU goes: per-stage cost in µs per reading, two ways.

1. From a sampling profile of the drain run: py-spy records collapsed stacks of the worker
   processes (`--subprocesses`, `--nonblocking`: the workers are never paused) while they
   drain the backlog. py-spy leaves out idle threads (waiting in epoll, on a lock), so a
   sample is on-CPU time. Each stack is given to one stage by its frames (see `classify`);
   samples / rate / readings is the stage's CPU µs per reading, summed over workers.
2. Directly, in-process: decode + verify (`ingest.pipeline`, as the worker calls them) +
   judge over pre-signed payloads on one pinned core, timed with perf_counter. No I/O,
   so this is "validation" alone, exactly.

The profile is statistical (± a few samples per stage) and its process start and imports
are kept apart as "startup", not charged to readings.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from meterproof.bench.limits import one_core
from meterproof.ingest.decode import Decoded
from meterproof.ingest.judge import RateLimit, StoredContext, judge
from meterproof.ingest.pipeline import decode_all, verify_all
from meterproof.ingest.verify import TimeBounds
from meterproof.registry.snapshots import MeterSnapshot, RegisteredKey
from meterproof.schemas.signatures import PublicKey
from meterproof.schemas.timestamps import wall_ms
from meterproof.stack.process import end_child, executable

#: (path fragment, function names or () for any, stage), tried on each frame from the leaf
#: up; the first frame that matches a rule decides. A function name is the last part of
#: py-spy's qualified name (`MqttSource.publish_many` -> `publish_many`). Our own modules
#: name their stage; of the libraries, only those a single stage uses are listed here.
RULES: Final[tuple[tuple[str, tuple[str, ...], str], ...]] = (
    ("ingest/decode.py", (), "decode"),
    ("ingest/pipeline.py", ("decode_all",), "decode"),
    ("ingest/pipeline.py", ("verify_all",), "verify"),
    ("ingest/pipeline.py", ("split_replayed",), "replay check"),
    ("schemas/codec.py", (), "decode"),
    ("schemas/signing.py", (), "decode"),  # signing bytes + reading hash, made in decode
    ("ingest/verify.py", (), "verify"),
    ("schemas/signatures.py", (), "verify"),
    ("ingest/keys.py", (), "verify"),  # the registry snapshot the signature is checked with
    ("solders/", (), "verify"),
    ("ingest/replay.py", (), "replay check"),
    ("redis/", (), "replay check"),
    ("ingest/judge.py", (), "judge (rules 7-9)"),
    ("ingest/store.py", (), "store"),
    ("psycopg", (), "store"),
    ("ingest/publish.py", (), "publish"),
    ("ingest/source.py", ("publish", "publish_many", "_on_puback"), "publish"),
    ("ingest/_wire.py", ("publish_packet", "parse_puback"), "publish"),
    (
        "ingest/_gmqtt.py",
        ("push_message", "remove_message_by_mid", "full", "wait_for_room"),
        "publish",
    ),
    ("ingest/_gmqtt.py", ("next_packet_id", "free_packet_id"), "publish"),
    ("ingest/worker.py", ("_announce",), "publish"),
    ("gmqtt/", ("_handle_puback_packet",), "publish"),  # the broker's PUBACKs of our publishes
    ("gmqtt/client.py", ("publish",), "publish"),
    ("ingest/source.py", ("ack",), "acknowledge"),
    ("ingest/_wire.py", ("puback_packet",), "acknowledge"),
    ("gmqtt/", ("__handle_publish_callback", "_send_puback"), "acknowledge"),
    ("ingest/source.py", ("_transport_write",), ""),  # shared by ack and publish: caller decides
    ("ingest/_gmqtt.py", ("write_raw",), ""),
    ("ingest/source.py", (), "receive"),
    ("ingest/_wire.py", (), "receive"),
    ("ingest/_gmqtt.py", (), "receive"),
    ("ingest/batcher.py", (), "receive"),
    ("ingest/worker.py", ("_receive", "_next_batch"), "receive"),
    ("ingest/worker.py", ("_record",), "telemetry + logs"),
    ("ingest/telemetry.py", (), "telemetry + logs"),
    ("prometheus_client/", (), "telemetry + logs"),
    ("structlog/", (), "telemetry + logs"),
    ("logging/", (), "telemetry + logs"),
    ("ingest/worker.py", (), "worker bookkeeping"),
)
#: When no rule matched: socket and TLS work in the event loop is receiving (sending is
#: caught above by the publish and acknowledge frames that call into it).
TRANSPORT: Final = ("gmqtt/", "ssl", "sslproto.py", "selector_events.py", "selectors.py")
STARTUP: Final = ("<frozen importlib", "importlib/")
STAGES: Final = (
    "receive", "decode", "verify", "replay check", "judge (rules 7-9)", "store",
    "acknowledge", "publish", "worker bookkeeping", "telemetry + logs", "event loop + other",
)  # fmt: skip


def frames_of(line: str) -> tuple[list[str], int] | None:
    """One line of py-spy's raw (collapsed) output: frames root first, and its count."""
    stack, _, count = line.rstrip().rpartition(" ")
    if not stack or not count.isdigit():
        return None
    frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
    return frames, int(count)


def _frame_parts(frame: str) -> tuple[str, str]:
    """`func (path:line)` -> (func, path)."""
    func, _, where = frame.partition(" (")
    return func, where.rpartition(":")[0]


def classify(frames: Sequence[str]) -> str:
    if any(_frame_parts(f)[1].startswith(STARTUP) for f in frames):
        return "startup"
    for frame in reversed(frames):
        func, path = _frame_parts(frame)
        name = func.rpartition(".")[2]
        rule = next((r for r in RULES if r[0] in path and (not r[1] or name in r[1])), None)
        if rule is not None and rule[2]:
            return rule[2]
    for frame in reversed(frames):
        _, path = _frame_parts(frame)
        if any(t in path for t in TRANSPORT):
            return "receive"
    return "event loop + other"


@dataclass(frozen=True, slots=True)
class StageCost:
    stage: str
    samples: int
    us_per_reading: float


@dataclass(frozen=True, slots=True)
class Profile:
    rate_hz: int
    readings: int
    workers: int
    samples: int
    startup_samples: int
    us_per_sample: float
    cpu_s: float | None
    stages: list[StageCost]

    @property
    def total_us(self) -> float:
        return sum(s.us_per_reading for s in self.stages)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_us_per_reading": self.total_us}


#: Innermost frames of an event loop waiting in epoll. Under live load py-spy counted such
#: waiting threads as busy (2,556 of 6,366 samples at 1,000 readings/s on a loaded machine:
#: docs/scaling.md, "Live path profile"); `attribute(skip_waits=True)` leaves them out.
WAITS: Final = ("EpollSelector.select ", "_PollLikeSelector.select ")


def attribute(
    lines: Iterable[str],
    *,
    rate_hz: int,
    readings: int,
    workers: int,
    cpu_s: float | None = None,
    skip_waits: bool = False,
) -> Profile:
    """Without `cpu_s` a sample is worth 1 / rate seconds. py-spy counts a thread that is
    runnable but waiting for a core as busy, so on a loaded machine that overstates; given
    the processes' measured CPU time (`cpu_s`, startup included), the samples only share
    it out among the stages."""
    counts: Counter[str] = Counter()
    for line in lines:
        parsed = frames_of(line)
        if parsed is None or (skip_waits and parsed[0] and parsed[0][-1].startswith(WAITS)):
            continue
        counts[classify(parsed[0])] += parsed[1]
    total = sum(counts.values())
    startup = counts.pop("startup", 0)
    us_per_sample = 1e6 / rate_hz if cpu_s is None or not total else cpu_s * 1e6 / total
    stages = [
        StageCost(stage, counts[stage], counts[stage] * us_per_sample / readings)
        for stage in STAGES
    ]
    return Profile(rate_hz, readings, workers, total, startup, us_per_sample, cpu_s, stages)


@contextmanager
def py_spy(pid: int, out: Path, *, rate_hz: int) -> Iterator[None]:
    """Record `pid` and its children until the block ends; SIGINT makes py-spy write out."""
    spy = subprocess.Popen(
        [executable("py-spy", Path(__file__).resolve().parents[1] / ".venv/bin"), "record",
         "--format", "raw", "--nonblocking", "--subprocesses", "--rate", str(rate_hz),
         "--pid", str(pid), "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield
    finally:
        end_child(spy, signal.SIGINT, timeout=30)  # SIGINT: py-spy writes out its file
    if not out.exists():
        error = spy.stderr.read().decode(errors="replace") if spy.stderr else ""
        raise RuntimeError(f"py-spy wrote no profile: {error.strip()}")


#: perf's shared objects grouped by what they do for a reading; the first fragment found in
#: an object's name decides, anything else is "other".
LIBRARIES: Final[tuple[tuple[str, str], ...]] = (
    ("libpython", "interpreter"),
    ("_sodium", "libsodium (signatures)"),
    ("solders", "ed25519-dalek (signatures)"),
    ("[kernel", "kernel"),
    ("libcrypto", "OpenSSL (TLS)"),
    ("libssl", "OpenSSL (TLS)"),
    ("_ssl.", "OpenSSL (TLS)"),
    ("_psycopg", "psycopg + libpq"),
    ("pq.cpython", "psycopg + libpq"),
    ("libpq", "psycopg + libpq"),
    ("_pydantic_core", "pydantic-core"),
    ("libc.so", "libc"),
)
_DSO_LINE: Final = re.compile(r"^\s*([0-9.]+)%\s+(\S.*?)\s*$")


def library_costs(report: str, *, cpu_s: float, readings: int) -> dict[str, float]:
    """`perf report --sort dso` (`  54.26%  libpython3.11.so.1.0`) -> µs of CPU per reading
    by library, `cpu_s` shared out by the shares as `attribute` does with its samples."""
    shares: dict[str, float] = {}
    for line in report.splitlines():
        found = _DSO_LINE.match(line)
        if found is None:
            continue
        dso = found[2]
        group = next((g for fragment, g in LIBRARIES if fragment in dso), "other")
        shares[group] = shares.get(group, 0.0) + float(found[1]) / 100
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])
    return {g: round(share * cpu_s * 1e6 / max(readings, 1), 1) for g, share in ranked}


@dataclass(slots=True)
class PerfRun:
    """A `perf record` of processes: the hardware clock samples only what runs on a core.
    py-spy counts a thread that is runnable but not running (preempted in a system call
    with the GIL held, say) as busy; perf does not, so the two together tell CPU from
    waiting. `error` says why there is no recording (no perf, not permitted)."""

    out: Path
    error: str | None = None

    def costs(self, *, cpu_s: float, readings: int) -> dict[str, float] | None:
        if self.error is not None:
            return None
        report = subprocess.run(
            ["perf", "report", "--input", str(self.out), "--sort", "dso", "--no-children",
             "--call-graph", "none", "--stdio", "--quiet"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if report.returncode != 0 or not report.stdout.strip():
            self.error = _first_line(report.stderr) or "perf report gave nothing"
            return None
        return library_costs(report.stdout, cpu_s=cpu_s, readings=readings)


@contextmanager
def perf_record(pids: Sequence[int], out: Path, *, rate_hz: int) -> Iterator[PerfRun]:
    """Sample `pids` (every thread) until the block ends; without perf, or when the kernel
    refuses it, the block runs anyway and the run says why."""
    run = PerfRun(out)
    if shutil.which("perf") is None:
        run.error = "perf not found on PATH (Debian: linux-perf)"
        yield run
        return
    perf = subprocess.Popen(
        ["perf", "record", "--quiet", "--freq", str(rate_hz), "--pid",
         ",".join(map(str, pids)), "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield run
    finally:
        end_child(perf, signal.SIGINT, timeout=30)
        said = perf.stderr.read().decode(errors="replace") if perf.stderr else ""
        if perf.stderr:
            perf.stderr.close()
        # perf writes its file on SIGINT, then dies of it: that exit is a success
        if perf.returncode not in (0, -signal.SIGINT) or not out.exists():
            run.error = _first_line(said) or f"perf record exited {perf.returncode}"


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


@dataclass(frozen=True, slots=True)
class Validation:
    readings: int
    batch: int
    decode_us: float
    verify_us: float
    judge_us: float

    @property
    def total_us(self) -> float:
        return self.decode_us + self.verify_us + self.judge_us

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_us": self.total_us}


def validation_cost(
    decoded: Sequence[Decoded], keys: dict[str, PublicKey], *, batch: int = 1_000
) -> Validation:
    """decode + verify + judge of pre-signed payloads, on one pinned core, in batches of
    the worker's size (judge sees a batch, with nothing stored before it)."""
    snapshots = {
        m: MeterSnapshot(m, "active", (RegisteredKey("k", key, 0, None),))
        for m, key in keys.items()
    }
    bounds = TimeBounds()
    limit = RateLimit(window_ms=60_000, max_readings=60)
    messages = [d.message for d in decoded]
    decode_s = verify_s = judge_s = 0.0
    nothing_stored = StoredContext(None, 0, None, None)
    with one_core():
        for i in range(0, len(messages), batch):
            now_ms = wall_ms()
            t0 = time.perf_counter()
            passed, malformed = decode_all(messages[i : i + batch])
            t1 = time.perf_counter()
            candidates, rejected = verify_all(passed, snapshots, now_ms=now_ms, bounds=bounds)
            t2 = time.perf_counter()
            judge(candidates, [nothing_stored] * len(candidates), limit=limit)
            t3 = time.perf_counter()
            if malformed or rejected:
                raise RuntimeError("a pre-signed bench reading was rejected")
            decode_s += t1 - t0
            verify_s += t2 - t1
            judge_s += t3 - t2
    n = len(messages)
    return Validation(n, batch, decode_s * 1e6 / n, verify_s * 1e6 / n, judge_s * 1e6 / n)
