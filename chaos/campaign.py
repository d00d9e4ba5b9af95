"""One campaign, start to end: a private stack, the product under a simulated fleet, the
planned faults one by one, a bounded settle, the audit, the stack stopped again.

Order matters: the ingest workers and the bridge start before the fleet; the load is
taken to have started when the first reading is stored, and the plan's times count from
there; the bridge and the workers stop (SIGTERM) before the audit, so that it reads a
database nobody writes to.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meterproof.bench.machine import describe
from meterproof.certs.layout import PkiLayout
from meterproof.chaos.audit import Audit, run_audit
from meterproof.chaos.backlog import stored_count, unanchored_before
from meterproof.chaos.faults import (
    KILLING_KINDS,
    FaultRecord,
    Injector,
    ProductProcess,
    Target,
    bridge_process,
    ingest_process,
    wait_until,
    worker_pids,
)
from meterproof.chaos.plan import CampaignConfig, Plan, make_plan
from meterproof.config import StackEnv
from meterproof.errors import MeterproofError
from meterproof.meter.identity import discover
from meterproof.stack.commands import command_environ, meterproof_argv
from meterproof.stack.process import StackError, end_child, free_port
from meterproof.stack.services import LocalStack, Ports

Say = Callable[[str], None]


class CampaignError(MeterproofError):
    """The campaign could not run (a part never came up); no audit was possible."""


@dataclass(slots=True)
class CampaignResult:
    config: CampaignConfig
    plan: Plan
    machine: dict[str, str]
    started: datetime
    elapsed_s: float = 0.0
    load_s: float = 0.0
    settle_s: float = 0.0
    faults: list[FaultRecord] = field(default_factory=list)
    fleet: dict[str, Any] = field(default_factory=dict)
    audit: Audit | None = None
    unexpected_exits: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        out = list(self.notes) if self.audit is None else []
        if self.audit is None:
            out.append("no audit: the campaign did not get that far")
        else:
            out += self.audit.problems()
        sent, generated = self.fleet.get("sent"), self.audit and self.audit.store.generated
        if self.audit is not None and sent != generated:
            out.append(f"the fleet reports {sent} readings sent, the audit expected {generated}")
        return out + self._faults_missed()

    def _faults_missed(self) -> list[str]:
        """A clean audit proves nothing about a fault that never happened: one skipped (the
        fleet ended first) or one that found nothing to hit; nor about one the product
        did not recover from in time (the next fault then lands on an unrecovered one)."""
        out = []
        if (skipped := len(self.plan.faults) - len(self.faults)) > 0:
            out.append(f"{skipped} of {len(self.plan.faults)} planned faults not injected")
        for f in self.faults:
            if not f.hit or (f.kind in KILLING_KINDS and not f.kills):
                out.append(f"{f.name} at {f.began_s:.1f} s did not happen: {f.note}")
            if f.recovery_s is None:
                timeout = self.config.recovery_timeout_s
                line = f"{f.name} at {f.began_s:.1f} s not recovered within {timeout:g} s"
                out.append(f"{line}: {f.note}" if f.note else line)
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()


def _stack_ports(*, ha: bool) -> Ports:
    """Free ports, never the conventional ones: a developer's own stack may hold those.
    A cluster picks its own."""
    ports: list[int] = []
    while len(ports) < 4:
        if (port := free_port()) not in ports:
            ports.append(port)
    postgres = None if ha else ports[2]
    return Ports(mqtt=ports[0], mqtt_admin=ports[1], postgres=postgres, redis=ports[3])


def run_campaign(config: CampaignConfig, *, work_dir: Path, say: Say) -> CampaignResult:
    """Run the whole campaign in `work_dir` (created, chmod 0755 for PostgreSQL's user)."""
    plan = make_plan(config)  # refuse a plan that does not fit before starting anything
    machine = describe() | {"load_average": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    result = CampaignResult(config, plan, machine, datetime.now(UTC))
    began = time.monotonic()
    work_dir.mkdir(parents=True, exist_ok=True)
    work_dir.chmod(0o755)  # PostgreSQL runs as its own unprivileged user
    stack = LocalStack(run_dir=work_dir / "stack", pki_root=work_dir / "pki", ha=config.ha)
    database = "a Patroni cluster (3 etcd, 2 PostgreSQL)" if config.ha else "PostgreSQL"
    say(f"stack: starting Mosquitto, {database} and Redis in {work_dir}")
    env, _ = stack.up(_stack_ports(ha=config.ha))
    try:
        _run(
            config=config,
            plan=plan,
            env=env,
            stack=stack,
            work_dir=work_dir,
            result=result,
            say=say,
        )
    except (CampaignError, StackError) as exc:  # a part never came (back) up: no audit
        result.notes.append(str(exc).splitlines()[0])
        say(str(exc))
    finally:
        stack.down()
        result.elapsed_s = time.monotonic() - began
    return result


def _run(
    *,
    config: CampaignConfig,
    plan: Plan,
    env: StackEnv,
    stack: LocalStack,
    work_dir: Path,
    result: CampaignResult,
    say: Say,
) -> None:
    logs = work_dir / "logs"
    logs.mkdir(exist_ok=True)
    _, redis_, broker = stack.servers(env)
    postgres = stack.database(env)
    state_root = work_dir / "meters"
    ingest = ingest_process(env, config, logs / "ingest.log")
    bridge = bridge_process(env, config, logs / "bridge.log")
    with ExitStack() as running:
        say(f"product: {config.workers} ingest workers, bridge with {config.epoch_s} s epochs")
        ingest.start()
        running.callback(ingest.stop)
        bridge.start()
        running.callback(bridge.stop)
        if not wait_until(lambda: len(worker_pids(ingest.pid)) == config.workers, timeout_s=30):
            raise CampaignError(f"the ingest workers did not start; see {logs / 'ingest.log'}")
        readings = config.readings_per_meter
        say(
            f"fleet: {config.meters} meters x {readings} readings every {config.interval_s:g} s"
            f" (~{config.meters / config.interval_s:.0f} readings/s)"
        )
        fleet = _start_fleet(env, config, state_root, logs)
        running.callback(end_child, fleet, signal.SIGTERM, timeout=30)
        if (
            not wait_until(
                lambda: (stored_count(env.database_url) or 0) > 0 or fleet.poll() is not None,
                timeout_s=180,
            )
            or fleet.poll() is not None
        ):
            raise CampaignError(f"no reading was stored; see {logs / 'fleet.log'}")
        load_started = time.time()
        say(f"load: first readings stored; {len(plan.faults)} faults to inject")
        target = Target(
            config,
            postgres,
            redis_,
            broker,
            ingest,
            bridge,
            state_root,
            env.database_url,
            tuple(stack.brokers(env)),
        )
        _inject_all(
            Injector(target, load_started=load_started, rng=random.Random(config.seed)),  # noqa: S311
            plan,
            result,
            fleet,
            say,
        )
        result.fleet = _wait_fleet(fleet, config, load_started, work_dir, say)
        result.load_s = round(time.time() - load_started, 1)
        settle_began = time.time()
        say("settle: waiting for the bridge to anchor every stored reading")
        anchored = wait_until(
            lambda: unanchored_before(env.database_url, time.time() + 3600) == 0,
            timeout_s=max(30.0, 3 * (config.epoch_s + config.seal_delay_s) + 15),
        )
        if not anchored:
            result.notes.append("not every stored reading was anchored at the settle bound")
        result.settle_s = round(time.time() - settle_began, 1)
        for process in (ingest, bridge):
            process.restart_if_dead(restart=False)  # about to stop anyway: only record it
            result.unexpected_exits[process.name] = list(process.unexpected_exits)
    # ingest and bridge stopped: the audit reads a database nobody writes to any more
    generated = {m.meter_id: config.readings_per_meter for m in discover(PkiLayout(env.pki_root))}
    say(f"audit: {sum(generated.values())} readings generated by {len(generated)} meters")
    result.audit = run_audit(env, generated)


def _start_fleet(
    env: StackEnv, config: CampaignConfig, state_root: Path, logs: Path
) -> subprocess.Popen[bytes]:
    """`meterproof simulate` as a user runs it; it issues and registers its meters."""
    argv = meterproof_argv(
        "simulate", "--meters", str(config.meters),
        "--readings", str(config.readings_per_meter),
        "--interval", str(config.interval_s),
        "--republish-after", str(config.republish_after_s),
        "--keepalive", str(config.meter_keepalive_s),
        "--receipt-timeout", str(config.settle_s),
        "--seed", str(config.seed),
        "--state-dir", str(state_root),
        "--progress-every", "30",
        "--stack-env", str(env.run_dir / "stack.env"),
        "--json",
    )  # fmt: skip
    with (logs / "fleet.json").open("wb") as out, (logs / "fleet.log").open("ab") as err:
        return subprocess.Popen(argv, env=command_environ(env), stdout=out, stderr=err)


def _inject_all(
    injector: Injector,
    plan: Plan,
    result: CampaignResult,
    fleet: subprocess.Popen[bytes],
    say: Say,
) -> None:
    """Each fault at its planned moment (later if the one before recovered late); the
    product's processes are watched in between, and restarted if one died on its own."""
    target = injector.t
    for n, fault in enumerate(plan.faults, 1):
        while injector.since_load() < fault.at_s:
            _watch(target.ingest, target.bridge, result, say)
            time.sleep(0.25)
        if fleet.poll() is not None:
            result.notes.append(f"the fleet ended before fault {n}; remaining faults skipped")
            say(result.notes[-1])
            return
        record = injector.run(fault)
        result.faults.append(record)
        recovery = "not recovered" if record.recovery_s is None else f"{record.recovery_s:.1f} s"
        say(
            f"[{record.began_s:6.1f}s] {n}/{len(plan.faults)} {record.name}:"
            f" {record.ended_s - record.began_s:.1f} s, recovery {recovery}"
            + (f"; {record.note}" if record.note else "")
        )
        _watch(target.ingest, target.bridge, result, say)


def _watch(
    ingest: ProductProcess, bridge: ProductProcess, result: CampaignResult, say: Say
) -> None:
    for process in (ingest, bridge):
        if process.restart_if_dead():
            code = process.unexpected_exits[-1]
            say(f"{process.name} exited on its own (exit {code}); started again")
            result.unexpected_exits[process.name] = list(process.unexpected_exits)


def _wait_fleet(
    fleet: subprocess.Popen[bytes],
    config: CampaignConfig,
    load_started: float,
    work_dir: Path,
    say: Say,
) -> dict[str, Any]:
    """The fleet ends by itself once every reading is sent and receipted (or its receipt
    timeout, the settle bound, has passed); its JSON summary is the fleet's own count."""
    load_end = load_started + config.readings_per_meter * config.interval_s + config.interval_s
    remaining = load_end - time.time()
    if remaining > 0:
        say(f"load: {remaining:.0f} s of load left after the last fault")
    try:
        fleet.wait(max(0.0, remaining) + config.settle_s + 30)
    except subprocess.TimeoutExpired:
        say("fleet: still running past its bound; stopping it")
        end_child(fleet, signal.SIGTERM, timeout=30)
    text = (work_dir / "logs" / "fleet.json").read_text(encoding="utf-8").strip()
    try:
        summary: dict[str, Any] = json.loads(text.splitlines()[-1]) if text else {}
    except json.JSONDecodeError:
        summary = {}
    say(
        f"fleet: sent {summary.get('sent')}, receipted {summary.get('receipted')},"
        f" unreceipted {summary.get('unreceipted')}, republished {summary.get('republished')}"
    )
    return summary
