"""A bench's private stack: its servers on free ports of their own and its meters
registered, for every bench that starts one (drain, load, limits, API); its ingest workers
waited for and stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psycopg

from meterproof.certs import issue_bulk
from meterproof.certs.layout import PkiLayout
from meterproof.config import StackEnv
from meterproof.registry import repository
from meterproof.registry.model import NewKey, NewMeter
from meterproof.stack.process import StackError, claim_port, end_child, free_port
from meterproof.stack.services import LocalStack, Ports


def provision_meters(pki: PkiLayout, database_url: str, count: int) -> dict[str, bytes]:
    ids = [f"bench-{i:05d}" for i in range(count)]
    issued = issue_bulk(pki, [i for i in ids if not pki.device(i).cert.exists()])
    meters = [NewMeter(d.record.name, NewKey.parse("EdDSA", d.public_key_pem)) for d in issued]
    with psycopg.connect(database_url, autocommit=True) as conn:
        repository.register(conn, meters)
    return {i: pki.device(i).signing_key.read_bytes() for i in ids}


def _private_ports() -> Ports:
    taken: set[int] = set()
    while len(taken) < 4:
        taken.add(free_port())
    mqtt, admin, pg, rd = sorted(taken)
    return Ports(mqtt=mqtt, mqtt_admin=admin, postgres=pg, redis=rd)


def up_on_free_ports(stack: LocalStack, *, ingest_workers: int, tries: int = 3) -> StackEnv:
    """Start `stack` on free ports, never the conventional ones (a developer's stack may
    hold those). A free port can still be taken before its server starts (seconds later,
    after initdb: an outgoing connection on this shared machine may get it as its
    ephemeral port), so a start that finds its port taken is tried again on new ports."""
    for _ in range(tries - 1):
        try:
            return stack.up(_private_ports(), ingest_workers=ingest_workers)[0]
        except StackError:
            stack.down()
    return stack.up(_private_ports(), ingest_workers=ingest_workers)[0]


def free_port_run(count: int) -> int:
    """A base port with `count` free ports after it (worker i serves /readyz on base + i),
    drawn at random as `free_port` draws: two bench runs at once must not pick one run."""
    for _ in range(100):
        base = free_port()
        if all(claim_port(base + i) for i in range(1, count)):
            return base
    raise RuntimeError("no run of free ports for the /readyz of the workers or the bridge")


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, *, poll_s: float = 0.2) -> None:
    """Until the process answers /readyz on `port` (60 s at most), asked every `poll_s`."""
    deadline = time.monotonic() + 60
    while not _ready(port):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited; see {log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.args!r} not ready on :{port}; see {log}")
        time.sleep(poll_s)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def stop_workers(proc: subprocess.Popen[bytes], *, timeout: float = 60) -> None:
    """SIGTERM to `meterproof ingest --workers N`, started in a session of its own: its
    supervisor stops the workers and waits for them. Should it not end in `timeout`,
    `end_child` kills the supervisor, and then its whole process group: killing the
    supervisor alone would leave its workers running."""
    end_child(proc, signal.SIGTERM, timeout=timeout)
    if proc.returncode == -signal.SIGKILL:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
