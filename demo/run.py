"""The demo, step by step: stack, PKI, workers, bridge, a simulated fleet with a few
misbehaving meters, then a summary of what each part did and where to look next.

Every part runs as the real command a user would start (`meterproof ingest`, `bridge`,
`simulate`), so the demo shows the product, not a special path through it.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from meterproof.config import DEFAULT_RUN_DIR, StackEnv
from meterproof.demo.api import ApiDemo
from meterproof.demo.consent import ConsentDemo
from meterproof.stack.commands import command_environ, meterproof_argv, start_command, stop_command
from meterproof.stack.services import LocalStack, Ports

if TYPE_CHECKING:
    from meterproof.stack.chain import DevChain

Say = Callable[[str], None]
WORKER_METRICS = 9108
BRIDGE_METRICS = 9100


@dataclass(frozen=True, slots=True)
class DemoOptions:
    meters: int = 100
    readings: int = 6
    interval_s: float = 5.0
    misbehave: float = 0.05
    workers: int = 2
    epoch_s: int = 10
    run_dir: Path = DEFAULT_RUN_DIR
    sink: str = "local"  #: or "evm": anchor on a local EVM dev node (demo/chain.py)


def _latency_ms(database_url: str, since: float) -> tuple[float, float, float]:
    """Receive -> commit inside the workers, p50/p99, and accepted readings per second."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            """
            SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY stored_at - received_at),
                   percentile_cont(0.99) WITHIN GROUP (ORDER BY stored_at - received_at),
                   count(*) / greatest(extract(epoch FROM max(stored_at) - min(stored_at)), 1)
            FROM readings WHERE stored_at >= to_timestamp(%s)
            """,
            (since,),
        ).fetchone()
    if row is None or row[0] is None:
        return 0.0, 0.0, 0.0
    return row[0].total_seconds() * 1000, row[1].total_seconds() * 1000, float(row[2])


def _wait_anchored(database_url: str, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM reading_log l LEFT JOIN bridge_batches b"
                " ON b.batch = l.batch_id WHERE b.status IS DISTINCT FROM 'anchored'"
            ).fetchone()
        if row is not None and row[0] == 0:
            return True
        time.sleep(1)
    return False


def run_demo(options: DemoOptions, say: Say) -> int:
    say("1/6 local stack: Mosquitto (mutual TLS), PostgreSQL, Redis on loopback")
    stack = LocalStack(run_dir=options.run_dir)
    env, _ = stack.up(Ports(), ingest_workers=options.workers)
    say(f"    mqtts://{env.mqtt_host}:{env.mqtt_port}  {env.database_url}  {env.redis_url}")
    logs = options.run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with ExitStack() as running:
        say(f"2/6 {options.workers} ingest workers (metrics on :{WORKER_METRICS}..)")
        workers = start_command(
            meterproof_argv("ingest", "--workers", str(options.workers)),
            command_environ(env, METERPROOF_METRICS_PORT=str(WORKER_METRICS)),
            logs / "ingest.log",
        )
        running.callback(stop_command, workers)
        chain = None
        if options.sink == "evm":
            from meterproof.demo.chain import start_chain

            chain = start_chain(options.run_dir)
            say(f"    EVM dev node {chain.node.url}, GridAnchor {chain.deployment.anchor}")
        sink_env = chain.environ if chain else {}
        say(f"3/6 ledger bridge, {options.epoch_s}-second epochs (metrics on :{BRIDGE_METRICS})")
        bridge = start_command(
            meterproof_argv("bridge"),
            command_environ(
                env,
                **sink_env,
                METERPROOF_EPOCH_SECONDS=str(options.epoch_s),
                METERPROOF_SEAL_DELAY_S="1",
                METERPROOF_CLAIM_INTERVAL_S="1",
                METERPROOF_METRICS_PORT=str(BRIDGE_METRICS),
            ),
            logs / "bridge.log",
        )
        running.callback(stop_command, bridge)
        api = ApiDemo(env, logs, say)
        say(f"    HTTP API on {api.url} (TLS 1.3, the operator CA)")
        api_up = api.start(running)
        consent = ConsentDemo(env, say)
        consent.start()
        running.callback(consent.stop)
        time.sleep(2)  # workers and bridge connect and subscribe
        say(
            f"4/6 simulated fleet: {options.meters} meters x {options.readings} readings, "
            f"every {options.interval_s:g} s, {options.misbehave:.0%} misbehaving"
        )
        with tempfile.TemporaryDirectory(prefix="meterproof-demo-") as state:
            sim = subprocess.run(
                meterproof_argv(
                    "simulate", "--meters", str(options.meters),
                    "--readings", str(options.readings),
                    "--interval", str(options.interval_s),
                    "--misbehave", str(options.misbehave),
                    "--state-dir", state, "--json",
                ),
                env=command_environ(env), stdout=subprocess.PIPE, check=False,
            )  # fmt: skip
        if not sim.stdout.strip():
            say("    the simulator printed no summary; see the lines above")
            return 1
        fleet: dict[str, Any] = json.loads(sim.stdout)
        say("5/6 waiting for the bridge to anchor every stored reading")
        anchored = _wait_anchored(env.database_url, within_s=options.epoch_s * 4 + 30)
        p50, p99, rate = _latency_ms(env.database_url, started)
        say("6/6 summary")
        rejected = ", ".join(f"{r} {n}" for r, n in fleet["rejected"].items()) or "none"
        for line in (
            f"    sent        {fleet['sent']} readings from {fleet['meters']} meters",
            f"    accepted    {fleet['accepted']}",
            f"    duplicate   {fleet['duplicate']}",
            f"    rejected    {sum(fleet['rejected'].values())} ({rejected})",
            f"    misbehaved  {fleet['misbehaved']} bad readings, {fleet['caught']} caught",
            f"    unreceipted {fleet['unreceipted']}",
            f"    rate        {rate:,.0f} readings/s stored (the fleet's pace, not a limit)",
            f"    latency     receive->commit p50 {p50:.1f} ms, p99 {p99:.1f} ms",
        ):
            say(line)
        consent_ok = consent.summary()
        ledger_ok = _ledger_summary(env, say, chain) if anchored else False
        if not anchored:
            say(f"    not every reading was anchored in time; see {logs / 'bridge.log'}")
        newest = _newest_anchored(env.database_url)
        api_ok = api_up and newest is not None and api.curl_lines(*newest)
    _next_steps(env, options.run_dir, say)
    passed = fleet["exit_code"] == 0 and anchored and ledger_ok and consent_ok and api_ok
    return 0 if passed else 1


def _newest_anchored(database_url: str) -> tuple[str, str] | None:
    """(meter id, reading hash) of the newest anchored reading."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT l.meter_id, encode(l.reading_hash, 'hex') FROM reading_log l"
            " JOIN bridge_batches b ON b.batch = l.batch_id WHERE b.status = 'anchored'"
            " ORDER BY l.stored_at DESC LIMIT 1"
        ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]))


def _ledger_summary(env: StackEnv, say: Say, chain: DevChain | None) -> bool:
    environ = command_environ(env, **(chain.environ if chain else {}))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            meterproof_argv(*args), env=environ, capture_output=True, text=True, check=False
        )

    if chain is not None:
        from meterproof.demo.chain import chain_summary

        return chain_summary(chain, env.database_url, cli, say)

    say("    ledger entries:")
    for line in cli("ledger", "entries", "--limit", "5").stdout.splitlines():
        say(f"      {line}")
    say("    GRID minted per wallet:")
    for line in cli("ledger", "balances").stdout.splitlines():
        say(f"      {line}")
    verify = cli("ledger", "verify")
    say(f"    ledger verify: {verify.stdout.strip() or verify.stderr.strip()}")
    newest = _newest_anchored(env.database_url)
    if newest is None:
        return False
    reading_hash = newest[1]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as proof_file:
        proof = cli("ledger", "proof", reading_hash)
        proof_file.write(proof.stdout)
    checked = cli("ledger", "check-proof", proof_file.name)
    Path(proof_file.name).unlink()
    verdict = checked.stdout.strip() or checked.stderr.strip()
    say(f"    proof of reading {reading_hash[:16]}..: {verdict}")
    return verify.returncode == 0 and checked.returncode == 0


def _next_steps(env: StackEnv, run_dir: Path, say: Say) -> None:
    logs = run_dir / "logs"
    down = "" if run_dir == DEFAULT_RUN_DIR else f" --run-dir {run_dir}"
    say("where to look next:")
    say(f"    metrics   curl http://127.0.0.1:{WORKER_METRICS}/metrics  (bridge :{BRIDGE_METRICS})")
    say(f"    database  psql '{env.database_url}'  (tables: readings, rejected_readings, ...)")
    say("    topics    integrators/<name>/verified/# (what consents allow: `meterproof consent`),")
    say("              ledger/epochs, meters/<id>/receipts; docs/consent.md")
    say("    HTTP API  stops with the demo; `METERPROOF_API_OPERATOR_SECRET=... meterproof api`")
    say("              serves it again (https://127.0.0.1:8443/docs), docs/api.md")
    say(f"    logs      {logs / 'ingest.log'}, {logs / 'bridge.log'}, {logs / 'api.log'}")
    say(f"    the stack keeps running: `meterproof stack down{down}` stops it")
