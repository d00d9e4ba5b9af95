"""Injecting each fault kind into the running product, and timing its recovery.

The product runs as a user runs it: `meterproof ingest --workers N` (whose supervisor
restarts a dead worker) and `meterproof bridge`, each in a session of its own; the
servers are the local stack's own runners. A fault's recovery time runs from the end of
the fault (the process killed, the server back) until its backlog is drained
(`chaos.backlog`).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

from meterproof.chaos.backlog import (
    ingest_caught_up,
    meters_stored_since,
    stored_since,
    unanchored_before,
)
from meterproof.chaos.plan import (
    ETCD_DOWN_S,
    HA_KINDS,
    PRIMARY_PAUSED_S,
    STANDBY_FROZEN_S,
    WORKER_DATABASE_TIMEOUT_S,
    CampaignConfig,
    FaultKind,
    PlannedFault,
)
from meterproof.config import StackEnv
from meterproof.errors import first_line
from meterproof.stack.broker import BrokerServer
from meterproof.stack.commands import command_environ, meterproof_argv, start_command, stop_command
from meterproof.stack.ha import HaCluster
from meterproof.stack.postgres import PostgresServer
from meterproof.stack.process import SpawnedServer, StackError
from meterproof.stack.redis import RedisServer

_POLL_S = 0.25
#: The kinds that kill at least once whenever they hit something: one with no kill found
#: nothing to hit (no live worker, no primary, one broker only).
KILLING_KINDS: Final = frozenset(
    {
        FaultKind.WORKER_KILL,
        FaultKind.BROKER_KILL,
        FaultKind.BRIDGE_KILL,
        FaultKind.PRIMARY_KILL,
        FaultKind.ETCD_KILL,
        FaultKind.BROKER_LOST,
    }
)
#: How long a broker killed with -9 stays down, as a service manager would restart it.
BROKER_DOWN_S = 1.0


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """One injected fault; times in seconds since the load started."""

    kind: FaultKind
    variant: str
    planned_s: float
    began_s: float
    ended_s: float
    #: Fault end -> backlog drained; None when not drained within the recovery timeout.
    recovery_s: float | None
    #: SIGKILLs this fault delivered (a crash-point bridge fault kills twice).
    kills: int = 0
    note: str = ""
    #: False when the fault did not take the effect it exists for, which no kill count
    #: shows: no standby to freeze, a bridge that never reached its crash point, a server
    #: to stop or restart that was already down, a cluster without a synchronous standby.
    hit: bool = True

    @property
    def name(self) -> str:
        """The kind, and the variant where there is one: "bridge_kill9 (before_submit)"."""
        return self.kind.value if self.variant == "-" else f"{self.kind.value} ({self.variant})"


class Effect(NamedTuple):
    """What an injection did, as its record keeps it."""

    kills: int
    note: str = ""
    hit: bool = True
    #: False when a fault that lasts until the pipeline shows its failover (a primary
    #: killed, a broker lost) ended at the recovery timeout instead: not recovered, however
    #: soon the backlog drains afterwards.
    recovered: bool = True


def sigkill(server: SpawnedServer) -> int:
    """kill -9 of a server of the stack; the kills delivered: 0 when it was not running
    (it died unseen), which is no fault injected."""
    if not server.is_running():
        return 0
    server.kill()
    return 1


def outage(server: SpawnedServer | PostgresServer | HaCluster, down_s: float) -> Effect:
    """A clean stop, `down_s` down, a start: one that found the server down stopped
    nothing (not hit)."""
    running = server.is_running()
    server.stop()
    time.sleep(down_s)
    server.start()
    return Effect(0) if running else Effect(0, "it was not running", hit=False)


def worker_pids(supervisor_pid: int) -> list[int]:
    """The supervisor's live children (zombies not yet reaped do not count)."""
    try:
        children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text()
    except OSError:
        return []
    live = []
    for pid in map(int, children.split()):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
        except OSError:
            continue
        if stat.rpartition(")")[2].split()[0] != "Z":
            live.append(pid)
    return live


class ProductProcess:
    """One `meterproof ...` command in its own session, restartable with extra env."""

    def __init__(self, name: str, argv: list[str], environ: dict[str, str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.environ = environ
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.unexpected_exits: list[int] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def start(self, **extra_env: str) -> None:
        self.proc = start_command(self.argv, {**self.environ, **extra_env}, self.log)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL to the whole session: the process and anything it started."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def wait_exit(self, timeout_s: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def restart_if_dead(self, *, restart: bool = True) -> bool:
        """Record an exit nobody asked for and start again; True if it had died."""
        if self.proc is None or self.proc.poll() is None:
            return False
        self.unexpected_exits.append(self.proc.returncode)
        if restart:
            self.start()
        else:
            self.proc = None
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_command(self.proc)


def ingest_process(env: StackEnv, config: CampaignConfig, log: Path) -> ProductProcess:
    environ = command_environ(
        env,
        METERPROOF_METRICS_PORT="0",
        METERPROOF_DATABASE_TIMEOUT_S=str(WORKER_DATABASE_TIMEOUT_S),
    )
    return ProductProcess(
        "ingest", meterproof_argv("ingest", "--workers", str(config.workers)), environ, log
    )


def bridge_process(env: StackEnv, config: CampaignConfig, log: Path) -> ProductProcess:
    """Short epochs, so that many epochs are sealed and anchored during the campaign."""
    environ = command_environ(
        env,
        METERPROOF_EPOCH_SECONDS=str(config.epoch_s),
        METERPROOF_SEAL_DELAY_S=str(config.seal_delay_s),
        METERPROOF_CLAIM_INTERVAL_S=str(config.claim_interval_s),
        METERPROOF_METRICS_PORT="0",
    )
    environ.pop("METERPROOF_BRIDGE_CRASH_AT", None)
    return ProductProcess("bridge", meterproof_argv("bridge"), environ, log)


@dataclass(slots=True)
class Target:
    """Everything a fault can hit, and where its backlog shows."""

    config: CampaignConfig
    postgres: PostgresServer | HaCluster
    redis: RedisServer
    broker: BrokerServer
    ingest: ProductProcess
    bridge: ProductProcess
    state_root: Path
    database_url: str
    #: Every broker, in the meters' order (`stack up --ha` has two; `broker` is the first).
    brokers: tuple[BrokerServer, ...] = ()


class Injector:
    def __init__(self, target: Target, *, load_started: float, rng: random.Random) -> None:
        """`load_started` is wall-clock time (outbox files and the database use it too)."""
        self.t = target
        self.load_started = load_started
        self.rng = rng
        self._victim: int | None = None
        self._broker_faults = 0

    def since_load(self, wall: float | None = None) -> float:
        return (time.time() if wall is None else wall) - self.load_started

    def run(self, fault: PlannedFault) -> FaultRecord:
        if fault.kind in HA_KINDS:
            # The last failover's crashed node back as the synchronous standby first:
            # without one there is nothing to fail over to, and the fault is not injected
            # (the campaign goes on to its audit, and fails on the fault not done).
            try:
                self._cluster().wait_replicated(timeout=self.t.config.recovery_timeout_s)
            except StackError as exc:
                now = round(self.since_load(), 2)
                note = f"not injected: {first_line(exc)}"
                return FaultRecord(
                    fault.kind, fault.variant, fault.at_s, now, now, None, note=note, hit=False
                )
        began = time.time()
        effect = self._inject_ha(fault.kind) if fault.kind in HA_KINDS else self._inject(fault)
        ended = time.time()
        recovery = self._wait_recovered(fault.kind, ended)
        if not effect.recovered:
            recovery = None
        return FaultRecord(
            kind=fault.kind,
            variant=fault.variant,
            planned_s=fault.at_s,
            began_s=round(self.since_load(began), 2),
            ended_s=round(self.since_load(ended), 2),
            recovery_s=None if recovery is None else round(recovery, 2),
            kills=effect.kills,
            note=effect.note,
            hit=effect.hit,
        )

    def _inject(self, fault: PlannedFault) -> Effect:
        t = self.t
        match fault.kind:
            case FaultKind.WORKER_KILL:
                return self._kill_worker()
            case FaultKind.BROKER_RESTART:
                return outage(t.broker, 0.0)
            case FaultKind.BROKER_KILL:
                kills = sigkill(t.broker)
                time.sleep(BROKER_DOWN_S)
                t.broker.start()
                return Effect(kills, "" if kills else "the broker was not running")
            case FaultKind.POSTGRES_STOP:
                return outage(t.postgres, fault.outage_s)
            case FaultKind.REDIS_STOP:
                return outage(t.redis, fault.outage_s)
            case FaultKind.BRIDGE_KILL:
                return self._kill_bridge(fault.variant)
        raise ValueError(f"{fault.kind} is not a fault of the single-PostgreSQL stack")

    def _inject_ha(self, kind: FaultKind) -> Effect:
        """The cluster's faults; their note names the node or member hit."""
        cluster = self._cluster()
        match kind:
            case FaultKind.PRIMARY_KILL:
                effect = self._kill_primary(cluster)
            case FaultKind.PRIMARY_PAUSE:
                effect = self._pause_primary(cluster)
            case FaultKind.SWITCHOVER:
                old = cluster.primary()
                new = cluster.switchover()
                effect = Effect(0, f"{'-' if old is None else old.name} -> {new.name}")
            case FaultKind.BROKER_LOST:
                effect = self._lose_broker()
            case FaultKind.BROKER_PAUSE:
                effect = self._pause_broker()
            case FaultKind.STANDBY_FREEZE:
                effect = self._freeze_standby(cluster)
            case _:
                effect = self._kill_etcd_member(cluster)
        return effect

    def _freeze_standby(self, cluster: HaCluster) -> Effect:
        standby = cluster.standby()
        if standby is None:
            return Effect(0, "no standby to freeze", hit=False)
        standby.freeze()
        try:
            time.sleep(STANDBY_FROZEN_S)
        finally:
            standby.thaw()
        return Effect(0, standby.name)

    def _kill_etcd_member(self, cluster: HaCluster) -> Effect:
        member = self.rng.choice(cluster.etcd)
        kills = sigkill(member)
        time.sleep(ETCD_DOWN_S)
        member.start()
        return Effect(kills, member.name if kills else f"{member.name} was not running")

    def _cluster(self) -> HaCluster:
        if not isinstance(self.t.postgres, HaCluster):
            raise TypeError("an HA fault needs the Patroni cluster (--ha)")
        return self.t.postgres

    def _pause_primary(self, cluster: HaCluster) -> Effect:
        """SIGSTOP of the primary's PostgreSQL and Patroni for `PRIMARY_PAUSED_S`, then
        SIGCONT. The note gives the time from the pause to the first reading stored after
        it, which can only be on the new primary; none stored while it was paused means
        the pipeline waited for the silent node (only the resets of its demotion would
        have freed it): not recovered."""
        old = cluster.primary()
        if old is None:
            return Effect(0, "no primary to pause", hit=False)
        paused_at = time.time()
        old.pause()
        try:
            stored = wait_until(
                lambda: stored_since(self.t.database_url, paused_at),
                timeout_s=PRIMARY_PAUSED_S,
                poll_s=0.1,
            )
            stored_s = time.time() - paused_at
            time.sleep(max(0.0, PRIMARY_PAUSED_S - stored_s))
            new = cluster.primary()  # before the resume: until its demotion, both say so
        finally:
            old.resume()
        note = f"{old.name} -> {'-' if new is None else new.name}"
        if not stored:
            return Effect(
                0, f"{note}; no reading stored while it was paused ({PRIMARY_PAUSED_S:g} s)",
                recovered=False,
            )  # fmt: skip
        return Effect(0, f"{note}; first reading stored {stored_s:.1f} s after the pause")

    def _kill_primary(self, cluster: HaCluster) -> Effect:
        """kill -9 of the primary's postmaster; the fault lasts until a reading is stored
        after the kill, which can only be on the new primary: its duration is the
        failover time as the pipeline sees it."""
        old = cluster.primary()
        if old is None:
            return Effect(0, "no primary to kill")
        killed_at = time.time()
        old.kill_postgres()
        timeout = self.t.config.recovery_timeout_s
        stored = wait_until(
            lambda: stored_since(self.t.database_url, killed_at), timeout_s=timeout, poll_s=0.1
        )
        new = cluster.primary()
        note = f"{old.name} -> {'-' if new is None else new.name}"
        if not stored:
            return Effect(
                1, f"{note}; no reading stored within {timeout:g} s of the kill", recovered=False
            )
        return Effect(1, note)

    def _lose_broker(self) -> Effect:
        """kill -9 of a broker (`_next_broker_hit`). The fault lasts until every meter has
        a reading stored after the kill, which for the meters of the lost broker means
        through the other: its duration is the fleet's failover time. Then the broker is
        started again."""
        victim = self._next_broker_hit()
        if victim is None:
            return Effect(0, "one broker only: nothing to fail over to")
        killed_at = time.time()
        if not sigkill(victim):
            victim.start()
            return Effect(0, f"{victim.name} was not running")
        try:
            return self._fleet_through_other(victim, since=killed_at, kills=1)
        finally:
            victim.start()

    def _pause_broker(self) -> Effect:
        """SIGSTOP of a broker (`_next_broker_hit`): no connection closes, so the meters
        leave it by their keepalive and the workers cut their link to it after
        `broker_silent_s`. The fault lasts until every meter has a reading stored after
        the pause; then the broker is resumed."""
        victim = self._next_broker_hit()
        if victim is None:
            return Effect(0, "one broker only: nothing to fail over to", hit=False)
        if not victim.is_running():
            return Effect(0, f"{victim.name} was not running", hit=False)
        paused_at = time.time()
        victim.pause()
        try:
            return self._fleet_through_other(victim, since=paused_at, kills=0)
        finally:
            victim.resume()

    def _next_broker_hit(self) -> BrokerServer | None:
        """The broker a broker fault hits: the first the first time (every meter starts
        there), then the one they moved to; None with one broker."""
        brokers = self.t.brokers
        if len(brokers) < 2:
            return None
        victim = brokers[self._broker_faults % len(brokers)]
        self._broker_faults += 1
        return victim

    def _fleet_through_other(self, victim: BrokerServer, *, since: float, kills: int) -> Effect:
        """Wait until every meter has a reading stored after `since`, within the recovery
        timeout; not recovered otherwise."""
        meters, timeout = self.t.config.meters, self.t.config.recovery_timeout_s
        moved = 0
        while time.time() < since + timeout:
            moved = meters_stored_since(self.t.database_url, since)
            if moved >= meters:
                break
            time.sleep(_POLL_S)
        if moved < meters:
            note = f"{meters - moved} of {meters} meters did not come through the other broker"
            return Effect(kills, f"{victim.name}; {note} within {timeout:g} s", recovered=False)
        return Effect(kills, f"{victim.name}; {moved} of {meters} meters stored through")

    def _kill_worker(self) -> Effect:
        pids = sorted(worker_pids(self.t.ingest.pid))
        if not pids:
            return Effect(0, "no live worker to kill")
        victim = self._victim = self.rng.choice(pids)
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:  # it died on its own since it was listed: no kill
            return Effect(0, f"worker {pids.index(victim)} of {len(pids)} had exited")
        return Effect(1, f"worker {pids.index(victim)} of {len(pids)}")

    def _kill_bridge(self, variant: str) -> Effect:
        """A SIGKILL now; for a crash-point variant, a restart armed to SIGKILL itself at
        that step of anchoring (the next sealed epoch reaches it), then a clean restart; one
        that never reached its crash point did not exercise it (not hit). Only the kills
        delivered count: an exit of the bridge's own is recorded as such, not as a kill."""
        bridge, kills, hit = self.t.bridge, 0, True
        notes: list[str] = []
        if bridge.restart_if_dead(restart=False):
            notes.append(f"had exited on its own (exit {bridge.unexpected_exits[-1]})")
        else:
            bridge.kill9()
            kills += 1
        if variant != "random":
            bridge.start(METERPROOF_BRIDGE_CRASH_AT=variant)
            c = self.t.config
            code = bridge.wait_exit(c.epoch_s + c.seal_delay_s + 30)
            if code == -signal.SIGKILL:
                kills += 1
                notes.append(f"then killed itself at {variant}")
            elif code is None:
                bridge.kill9()
                kills += 1
                notes.append(f"did not reach {variant} in time; killed")
                hit = False
            else:
                bridge.restart_if_dead(restart=False)
                notes.append(f"exited on its own before {variant} (exit {code})")
                hit = False
        bridge.start()
        return Effect(kills, "; ".join(notes), hit)

    def _recovered(self, kind: FaultKind, ended: float) -> bool:
        t = self.t
        if kind is FaultKind.BRIDGE_KILL:
            return unanchored_before(t.database_url, ended) == 0
        if kind is FaultKind.WORKER_KILL:
            live = worker_pids(t.ingest.pid)
            if self._victim in live or len(live) < t.config.workers:
                return False  # not dead yet, or not replaced yet
        return ingest_caught_up(t.state_root, ended)

    def _wait_recovered(self, kind: FaultKind, ended: float) -> float | None:
        deadline = ended + self.t.config.recovery_timeout_s
        while time.time() < deadline:
            if self._recovered(kind, ended):
                return time.time() - ended
            time.sleep(_POLL_S)
        return None


def wait_until(predicate: Callable[[], bool], *, timeout_s: float, poll_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()
