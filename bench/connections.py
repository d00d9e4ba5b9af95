"""Many concurrent mutual-TLS meter sessions on one Mosquitto, or sharded over several,
each reporting on a fixed interval, with ingest keeping up.

Interface (stable; `meterproof bench connections`, `bench shards` and the report call it):

    run_connections(run_dir: Path, *, meters: int, interval_s: float, seconds: float,
                    workers: int, progress: Callable[[str], None],
                    brokers: int = 1) -> dict[str, Any]

A private stack in `run_dir` (stopped afterwards) with `brokers` brokers, every worker
subscribed on each; `meters` device certificates issued and registered; the meters
connect from `bench.loadgen` processes (at most 9,000 each: a process may open 20,000
files here), each meter to the broker a hash of its id names
(`bench.loadgen.plan.broker_index`), then every meter publishes one reading every
`interval_s` for `seconds` (round-robin pacing: meters / interval_s readings/s).

Returned keys:
- `meters`, `brokers`, `generators`, `interval_s`, `seconds`, `workers`, `offered_per_s`.
- `broker_limits`: `max_connections` (the TLS listener's, from the rendered config; every
  broker has the same) and `open_files` (the first broker process's RLIMIT_NOFILE soft
  limit): whichever is lower caps the sessions one broker holds.
- `connect`: `meters`, `connected`, `seconds`, `handshakes_per_s`, `per_second`,
  `per_broker` (meters connected to each broker), `errors` (kind -> count),
  `broker_cpu_s` (all brokers) and `broker_cpu_ms_per_handshake` during the ramp.
- `broker_key`: `type` of the broker certificate's key and `signs_per_s` on one core
  (TLS 1.3 costs the server one signature per handshake, so this bounds handshakes/s).
- `broker_memory`: `rss_before_mib`, `rss_after_mib` (all brokers), `per_connection_kib`.
- `generator_memory`: `rss_mib` of the generator processes once every meter connected
  (their interpreters included) and `per_meter_kib`, that divided by the meters.
- `warmup`, `reporting`: tier dicts as in `bench.load` (accepted/s, latency, backlog,
  CPU per process group, `connected` = sessions still up at the end, `disconnects`).
- `held`: meters connected at the end of reporting; `ingest_kept_up`: the reporting
  phase was sustained (no backlog growth, every reading receipted and stored).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped, unused-ignore]
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from meterproof.bench.load import WARMUP_RATE, connect_summary, max_seq
from meterproof.bench.loadgen import plan
from meterproof.bench.loadgen.control import BenchStack, Generators, measure
from meterproof.certs.layout import PkiLayout
from meterproof.mosquitto.config import broker_files


def broker_key_sign_rate(pki: PkiLayout, seconds: float = 1.0) -> dict[str, Any]:
    """Signatures/s with the broker's own key, as TLS 1.3 CertificateVerify makes them."""
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    data = b"\x20" * 64 + b"TLS 1.3, server CertificateVerify\x00" + b"\x00" * 48
    sign: Callable[[], object]
    if isinstance(key, ec.EllipticCurvePrivateKey):
        kind = f"ECDSA {key.curve.name}"
        sign = lambda: key.sign(data, ec.ECDSA(hashes.SHA256()))  # noqa: E731
    elif isinstance(key, rsa.RSAPrivateKey):
        kind = f"RSA-{key.key_size} PSS"
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        sign = lambda: key.sign(data, pss, hashes.SHA256())  # noqa: E731
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        kind = "Ed25519"
        sign = lambda: key.sign(data)  # noqa: E731
    else:
        raise TypeError(f"unexpected broker key type {type(key).__name__}")
    count, began = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - began) < seconds:
        for _ in range(20):
            sign()
        count += 20
    return {"type": kind, "signs_per_s": round(count / elapsed)}


def listener_max_connections(conf_text: str, port: int) -> int | None:
    """The `max_connections` of the listener on `port` (None: unlimited)."""
    current: str | None = None
    for line in conf_text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "listener":
            current = words[1] if len(words) > 1 else None
        elif words[0] == "max_connections" and current == str(port):
            return int(words[1])
    return None


def _rss(pids: Sequence[int | None]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += int(psutil.Process(pid).memory_info().rss) if pid else 0
    return total


def _cpu_s(pids: Sequence[int | None]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times() if pid else None
            total += float(times.user + times.system) if times else 0.0
    return total


def _open_files_limit(pid: int | None) -> int | None:
    try:
        return int(psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)[0]) if pid else None
    except psutil.Error:
        return None


def run_connections(
    run_dir: Path,
    *,
    meters: int,
    interval_s: float,
    seconds: float,
    workers: int,
    progress: Callable[[str], None],
    brokers: int = 1,
) -> dict[str, Any]:
    if meters < 2 or interval_s <= 0 or seconds <= 0 or workers < 1 or brokers < 1:
        raise ValueError(
            "need meters >= 2, interval_s > 0, seconds > 0, workers >= 1, brokers >= 1"
        )
    rate = meters / interval_s
    processes = plan.generator_count(meters)
    warm_rate = min(WARMUP_RATE, meters)
    phases = [meters, round(rate * seconds)]
    ts_base = plan.ts_base_ms(int(time.time() * 1000), max_seq(meters, processes, phases))
    stack = BenchStack(run_dir, meters=meters, workers=workers, progress=progress, brokers=brokers)
    with stack.running() as b:
        conf = broker_files(b.stack.run_dir).conf.read_text(encoding="utf-8")
        pids = b.broker_pids()
        limits = {
            "max_connections": listener_max_connections(conf, b.env_required.mqtt_port),
            "open_files": _open_files_limit(pids[0]),
        }
        broker_key = broker_key_sign_rate(b.stack.layout)
        progress(
            f"broker key {broker_key['type']}: {broker_key['signs_per_s']:,} signatures/s; "
            f"limits {limits}"
        )
        rss0, cpu0 = _rss(pids), _cpu_s(pids)
        progress(
            f"connecting {meters:,} meters from {processes} generator processes "
            f"to {len(pids)} broker(s)"
        )
        with Generators(
            env=b.env_required,
            meter_ids=b.meter_ids,
            processes=processes,
            ts_base_ms=ts_base,
            run_dir=run_dir,
        ) as gens:
            connect = connect_summary(gens.answers(timeout=1800))
            broker_cpu = _cpu_s(pids) - cpu0
            connect["broker_cpu_s"] = round(broker_cpu, 2)
            connect["broker_cpu_ms_per_handshake"] = (
                round(broker_cpu * 1000 / connect["connected"], 3) if connect["connected"] else None
            )
            rss1 = _rss(pids)
            memory = {
                "rss_before_mib": round(rss0 / 2**20, 1),
                "rss_after_mib": round(rss1 / 2**20, 1),
                "per_connection_kib": round((rss1 - rss0) / 1024 / max(connect["connected"], 1), 1),
            }
            gen_rss = _rss(gens.pids)
            gen_memory = {
                "rss_mib": round(gen_rss / 2**20, 1),
                "per_meter_kib": round(gen_rss / 1024 / meters, 1),
            }
            progress(
                f"  {connect['connected']:,} of {meters:,} connected in {connect['seconds']} s "
                f"({connect['handshakes_per_s']:,.0f} handshakes/s, broker "
                f"{connect['broker_cpu_ms_per_handshake']} ms CPU each, "
                f"{memory['per_connection_kib']} KiB each; per broker {connect['per_broker']}; "
                f"generators {gen_memory['per_meter_kib']} KiB per meter); "
                f"errors {connect['errors'] or 'none'}"
            )
            warmup = measure(
                b, gens, rate=warm_rate, seconds=meters / warm_rate, tag="warmup",
                progress=progress,
            )  # fmt: skip
            reporting = measure(
                b, gens, rate=rate, seconds=seconds, tag="reporting", progress=progress
            )
    return {
        "meters": meters,
        "brokers": len(pids),
        "generators": processes,
        "interval_s": interval_s,
        "seconds": seconds,
        "workers": workers,
        "offered_per_s": rate,
        "broker_limits": limits,
        "connect": connect,
        "broker_key": broker_key,
        "broker_memory": memory,
        "generator_memory": gen_memory,
        "warmup": warmup,
        "reporting": reporting,
        "held": reporting["connected"],
        "ingest_kept_up": reporting["sustained"],
    }
