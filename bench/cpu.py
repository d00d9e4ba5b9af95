"""CPU per process group while a benchmark runs: the live tiers and the backlog drain
measure the stack's servers the same way, so their costs per reading compare.

Also each group's read(2) and write(2) calls (the kernel's `syscr` and `syscw`): Mosquitto
reads and writes its TLS sockets that way, one write per packet, so its calls per reading
show how many packets a reading costs it (docs/scaling.md, "What the 1,000/s tier still
pays for"). Python's asyncio sockets use send and recv, which these counters leave out."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil  # type: ignore[import-untyped, unused-ignore]

from meterproof.config import StackEnv
from meterproof.pidfile import read_pid
from meterproof.stack.services import LocalStack

#: A process group's pids as they are now (backends come and go).
Group = Callable[[], list[int]]


def process_tree(pid: int | None) -> list[int]:
    """`pid` and its descendants; empty once it is gone."""
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.Error:
        return []


def server_groups(stack: LocalStack, env: StackEnv) -> dict[str, Group]:
    """The stack's servers as groups: every broker, PostgreSQL (postmaster and backends),
    Redis."""
    postgres, redis_, _ = stack.servers(env)
    brokers = stack.brokers(env)
    return {
        "broker": lambda: [p for b in brokers for p in process_tree(b.pid())],
        "postgres": lambda: process_tree(
            read_pid(postgres.data_dir / "postmaster.pid", program="postgres")
        ),
        "redis": lambda: process_tree(redis_.pid()),
    }


@dataclass(slots=True)
class CpuSampler:
    """CPU seconds per process group from `start`, sampled as often as the caller calls
    `sample`. A process that appears meanwhile (a PostgreSQL backend) was born in the
    window, so all of its CPU counts; one that ends between samples loses its last part."""

    groups: dict[str, Group]
    first: dict[tuple[str, int], float] = field(default_factory=dict)
    last: dict[tuple[str, int], float] = field(default_factory=dict)
    io_first: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    io_last: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)
    started: float = 0.0
    machine0: Any = None
    #: False only for `start`'s own sample, which takes the baselines of what runs already
    counting: bool = False

    def sample(self) -> None:
        for group, pids in self.groups.items():
            rss = 0
            for pid in pids():
                try:
                    proc = psutil.Process(pid)
                    with proc.oneshot():
                        times = proc.cpu_times()
                        rss += proc.memory_info().rss
                        self.names.setdefault(pid, proc.name())
                except psutil.Error:
                    continue
                total = times.user + times.system
                self.first.setdefault((group, pid), 0.0 if self.counting else total)
                self.last[(group, pid)] = total
                self._sample_io(group, proc)
            self.rss[group] = rss

    def _sample_io(self, group: str, proc: psutil.Process) -> None:
        """Where the platform counts them (Linux; not macOS) and the process is ours."""
        try:
            io = proc.io_counters()
        except (psutil.Error, AttributeError):
            return
        calls = (io.read_count, io.write_count)
        self.io_first.setdefault((group, proc.pid), (0, 0) if self.counting else calls)
        self.io_last[(group, proc.pid)] = calls

    def start(self) -> None:
        self.first.clear()
        self.last.clear()
        self.io_first.clear()
        self.io_last.clear()
        self.started = time.monotonic()
        self.machine0 = psutil.cpu_times()
        self.counting = False
        self.sample()
        self.counting = True

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds per group from `start` to the last sample."""
        per_group = dict.fromkeys(self.groups, 0.0)
        for (group, pid), last in self.last.items():
            per_group[group] += last - self.first[(group, pid)]
        return per_group

    def rw_calls(self) -> dict[str, tuple[int, int]]:
        """(read, write) calls per group from `start` to the last sample, for the groups
        whose calls could be read."""
        per_group: dict[str, tuple[int, int]] = {}
        for (group, pid), (reads, writes) in self.io_last.items():
            r0, w0 = self.io_first[(group, pid)]
            r, w = per_group.get(group, (0, 0))
            per_group[group] = (r + reads - r0, w + writes - w0)
        return per_group

    def summary(self) -> dict[str, Any]:
        """Cores used per group (1.0 = one core busy), per process, and the whole machine's
        (other users included: the machine is shared); read and write calls per second;
        `seconds`, the window they are averaged over."""
        self.sample()
        wall = max(time.monotonic() - self.started, 1e-9)
        per_group = {g: used / wall for g, used in self.cpu_seconds().items()}
        per_process = {
            f"{group}/{self.names.get(pid, '?')}[{pid}]": round(
                (last - self.first[(group, pid)]) / wall, 3
            )
            for (group, pid), last in self.last.items()
        }
        m0, m1 = self.machine0, psutil.cpu_times()
        busy = (m1.user + m1.system + m1.nice + getattr(m1, "softirq", 0)) - (
            m0.user + m0.system + m0.nice + getattr(m0, "softirq", 0)
        )
        return {
            "seconds": round(wall, 2),
            "cores": {g: round(per_group[g], 3) for g in self.groups},
            "processes": per_process,
            "machine_cores": round(busy / wall, 3),
            "rss_mib": {g: round(v / 2**20, 1) for g, v in self.rss.items()},
            "rw_calls_per_s": {
                g: {"read": round(r / wall, 1), "write": round(w / wall, 1)}
                for g, (r, w) in self.rw_calls().items()
            },
        }
