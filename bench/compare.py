"""Before and after, on one machine: backlog drains of two checkouts, alternated.

A shared machine's speed moves by tens of percent from minute to minute, so a figure
from yesterday says little about today's change. Here each round drains the same backlog
with the baseline checkout and with this one (the baseline first in odd rounds, second in
even ones), each through its own `meterproof bench ingest` (its own venv, so each side
runs its own code), in a fresh temporary folder so neither writes into a checkout. The
ratio of the means is the comparison; the median and the range of the rounds' ratios, and
the load average before each run, show how much the machine's other work moved it.

With `live` rates, each round also runs each side's `meterproof bench load` at those
offered rates (no search): the server's CPU per accepted reading (workers, PostgreSQL,
broker, Redis; the load generator excluded), per process group, is compared per rate over
the rounds both sides sustained.

A round that fails ends the run (non-zero), its finished rounds kept: `CompareIncompleteError`
carries their figures, marked `incomplete`, for the command to save.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from meterproof.errors import InputError, MeterproofError, first_line
from meterproof.stack.process import end_child

_RESULT = re.compile(r"raw results: (\S+\.json)")
#: How long a side's run may take to stop its servers once told to.
_STOP_S: Final = 120
#: The process groups of a load tier that make up the server side...
SERVER: Final = ("workers", "postgres", "broker", "redis")
#: ...and the ledger bridge's, in a tier where it ran beside the workers (`--bridge`).
BRIDGE: Final = "bridge"


def command_of(checkout: Path) -> Path:
    """The checkout's own `meterproof`, from its venv."""
    command = checkout / ".venv" / "bin" / "meterproof"
    if not command.is_file():
        raise InputError(
            f"{command} is missing: give the checkout a venv "
            "(python3 -m venv .venv && .venv/bin/pip install -e '.[test]')"
        )
    return command


def _bench(command: Path, argv: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """One `meterproof bench ...` run in a fresh folder; its saved figures."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERPROOF_")}
    with tempfile.TemporaryDirectory(prefix="meterproof-compare-") as tmp:
        with subprocess.Popen(
            [str(command), "bench", *argv], cwd=tmp, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        ) as child:  # fmt: skip
            try:
                stdout, stderr = child.communicate(timeout=timeout_s)
            except BaseException as exc:
                # One SIGTERM, ours (its own session keeps a terminal's Ctrl-C away), not
                # subprocess.run's SIGKILL: the run stops the servers it started.
                end_child(child, signal.SIGTERM, timeout=_STOP_S)
                if isinstance(exc, subprocess.TimeoutExpired):
                    raise MeterproofError(
                        f"{command} bench {argv[0]} did not end in {timeout_s:.0f} s"
                    ) from None
                raise
        found = _RESULT.search(stderr + stdout)
        if child.returncode or found is None:
            tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
            raise MeterproofError(
                f"{command} bench {argv[0]} failed ({child.returncode}): {tail[0]}"
            )
        figures: dict[str, Any] = json.loads((Path(tmp) / found.group(1)).read_text())["figures"]
    return figures


def drain_once(command: Path, *, readings: int, workers: int, timeout_s: float) -> dict[str, Any]:
    """One `bench ingest` drain in a fresh folder; its run's figures."""
    argv = ["ingest", "--readings", str(readings), "--workers", str(workers), "--no-profile"]
    run: dict[str, Any] = _bench(command, argv, timeout_s)["runs"][0]
    return {k: v for k, v in run.items() if k != "samples"}


def server_cost(tier: dict[str, Any]) -> dict[str, Any]:
    """A load tier's server-side CPU in µs per accepted reading, per group and in all."""
    cores = tier["cpu"]["cores"]
    accepted = max(tier["accepted_per_s"], 1e-9)
    server = (*SERVER, BRIDGE) if BRIDGE in cores else SERVER
    groups = {g: cores.get(g, 0.0) * 1e6 / accepted for g in server}
    return {
        "offered_per_s": tier["offered_per_s"],
        "accepted_per_s": tier["accepted_per_s"],
        "sustained": tier["sustained"],
        "p99_ms": (tier.get("latency_ms") or {}).get("p99"),
        "us_per_reading": groups,
        "server_us_per_reading": sum(groups.values()),
        "generator_us_per_reading": cores.get("generator", 0.0) * 1e6 / accepted,
    }


def load_once(
    command: Path, *, rates: Sequence[int], seconds: float, meters: int, workers: int,
    timeout_s: float,
) -> list[dict[str, Any]]:  # fmt: skip
    """One `bench load` at the given rates in a fresh folder; each tier's server cost."""
    argv = ["load", "--rates", ",".join(str(r) for r in rates), "--seconds", f"{seconds:g}",
            "--meters", str(meters), "--workers", str(workers), "--search", "0"]  # fmt: skip
    return [server_cost(t) for t in _bench(command, argv, timeout_s)["tiers"]]


def round_order(round_no: int) -> tuple[str, str]:
    """Which side runs first in round `round_no` (from 1): baseline first in odd rounds,
    current first in even ones (ABBA), so whatever favours the first or the second run
    of a round (caches, a neighbour's cycle, the machine warming) falls on both sides."""
    return ("baseline", "current") if round_no % 2 else ("current", "baseline")


def round_ratios(runs: dict[str, list[dict[str, Any]]], key: str) -> list[float]:
    """Each round's current / baseline of `key`: their spread is the machine's noise."""
    pairs = zip(runs["baseline"], runs["current"], strict=True)
    return [c[key] / b[key] for b, c in pairs]


class CompareIncompleteError(MeterproofError):
    """A round failed; `figures` are those of the rounds that finished before it (both
    sides), marked `incomplete` with the error, so a long run's finished rounds are kept."""

    def __init__(self, message: str, figures: dict[str, Any]) -> None:
        super().__init__(message)
        self.figures = figures


def run_compare(
    baseline: Path,
    current: Path,
    *,
    label: str,
    rounds: int,
    readings: int,
    workers: int,
    progress: Callable[[str], None],
    timeout_s: float = 600.0,
    live: Sequence[int] = (),
    live_seconds: float = 15.0,
    live_meters: int = 2_000,
) -> dict[str, Any]:
    """`rounds` x (baseline, current); the figures, each side's means and their ratio.
    Raises `CompareIncompleteError` when a round fails."""
    sides = {"baseline": command_of(baseline), "current": command_of(current)}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    figures: dict[str, Any] = {
        "label": label,
        "baseline": _describe(baseline),
        "current": _describe(current),
        "readings": readings,
        "workers": workers,
        "runs": runs,
    }
    try:
        for i in range(1, rounds + 1):
            done = {}
            for side in round_order(i):
                done[side] = _side_run(
                    sides[side], f"round {i}/{rounds} {side}", readings=readings,
                    workers=workers, timeout_s=timeout_s, live=live, live_seconds=live_seconds,
                    live_meters=live_meters, progress=progress,
                )  # fmt: skip
            for side, run in done.items():
                runs[side].append(run)
    except Exception as exc:
        finished = len(runs["baseline"])
        figures["incomplete"] = {"error": first_line(exc), "rounds": finished, "of": rounds}
        if finished:
            figures |= _results(runs, live, seconds=live_seconds, meters=live_meters)
        raise CompareIncompleteError(
            f"round {finished + 1} of {rounds} failed ({finished} finished): {first_line(exc)}",
            figures,
        ) from exc
    return figures | _results(runs, live, seconds=live_seconds, meters=live_meters)


def _side_run(
    command: Path, what: str, *, readings: int, workers: int, timeout_s: float,
    live: Sequence[int], live_seconds: float, live_meters: int, progress: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    """One side's drain in a round, and its live tiers if asked."""
    load = os.getloadavg()[0]  # what else the shared machine was doing
    run = drain_once(command, readings=readings, workers=workers, timeout_s=timeout_s)
    progress(
        f"   {what}: {run['drain_per_s']:,.0f} readings/s, "
        f"{run['cpu_us_per_reading']:.1f} µs worker CPU per reading"
    )
    if live:
        run["live_load_1m_before"] = os.getloadavg()[0]
        run["live"] = load_once(
            command, rates=live, seconds=live_seconds, meters=live_meters, workers=workers,
            timeout_s=timeout_s,
        )  # fmt: skip
        progress(
            f"   {what} live: "
            + ", ".join(
                f"{t['offered_per_s']:,}/s {t['server_us_per_reading']:,.0f} µs"
                for t in run["live"]
            )
        )
    return {**run, "load_1m_before": load}


#: How a baseline from before the readiness accounting counts its drain (`same_accounting`).
OLDER_ACCOUNTING: Final = "from the workers' start"


def _start_up_included(run: dict[str, Any]) -> dict[str, Any]:
    """A drain counted from the workers' readiness (`ready_s`) put on the accounting of a
    checkout from before it: from the workers' start, their start-up included."""
    if "ready_s" not in run:
        return run
    seconds = run["ready_s"] + run["drain_s"]
    worker_cpu_s = run["worker_cpu_s"] + run["startup_cpu_s"]["workers"]
    return run | {
        "drain_per_s": run["readings"] / seconds,
        "cpu_us_per_reading": worker_cpu_s * 1e6 / run["readings"],
    }


def same_accounting(
    runs: dict[str, list[dict[str, Any]]],
) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """The drains of both sides counted alike, and how: from readiness when every run
    tells it, else all from the workers' start (a baseline from before readiness was
    counted would look dearer by the workers' start-up alone)."""
    if all("ready_s" in r for rs in runs.values() for r in rs):
        return runs, "from readiness"
    alike = {side: [_start_up_included(r) for r in rs] for side, rs in runs.items()}
    return alike, OLDER_ACCOUNTING


def _results(
    runs: dict[str, list[dict[str, Any]]], live: Sequence[int], *, seconds: float, meters: int
) -> dict[str, Any]:
    """Each side's means over `runs` (at least one round), their ratio, the median and the
    range of the rounds' ratios (the drains counted alike: `same_accounting`); with
    `live`, `live_summary`."""
    keys = ("drain_per_s", "cpu_us_per_reading")
    runs, accounting = same_accounting(runs)
    means = {
        side: {key: statistics.fmean(r[key] for r in rs) for key in keys}
        for side, rs in runs.items()
    }
    ratios = {key: round_ratios(runs, key) for key in keys}
    results: dict[str, Any] = {
        "drain_counted": accounting,
        "runs": runs,
        "means": means,
        "ratio": {key: means["current"][key] / means["baseline"][key] for key in keys},
        "median_round_ratio": {key: statistics.median(r) for key, r in ratios.items()},
        "round_ratio_range": {key: [min(r), max(r)] for key, r in ratios.items()},
    }
    if live:
        results["live"] = live_summary(runs, live, seconds=seconds, meters=meters)
    return results


def live_summary(
    runs: dict[str, list[dict[str, Any]]], rates: Sequence[int], *, seconds: float, meters: int
) -> dict[str, Any]:
    """Per offered rate: each side's mean server µs per accepted reading (and per group),
    the ratio of the means, and the median and range of the rounds' ratios, over the rounds
    both sides sustained: an overloaded tier's cost per reading is the backlog's, not the
    rate's. How many rounds that left out is said; with none left, no ratio."""
    return {
        "rates": list(rates),
        "seconds": seconds,
        "meters": meters,
        "per_rate": [_live_rate(runs, k, rate) for k, rate in enumerate(rates)],
    }


def _live_rate(runs: dict[str, list[dict[str, Any]]], k: int, rate: int) -> dict[str, Any]:
    """`live_summary` of the `k`-th rate."""
    every = {side: [r["live"][k] for r in rs] for side, rs in runs.items()}
    both = [
        i
        for i, (b, c) in enumerate(zip(every["baseline"], every["current"], strict=True))
        if b["sustained"] and c["sustained"]
    ]
    tiers = {side: [ts[i] for i in both] for side, ts in every.items()}
    out: dict[str, Any] = {
        "offered_per_s": rate,
        "sustained": {side: sum(1 for t in ts if t["sustained"]) for side, ts in every.items()},
        "rounds_compared": len(both),
        "rounds_left_out": len(every["baseline"]) - len(both),
    }
    if not both:
        return out
    server = {
        side: statistics.fmean(t["server_us_per_reading"] for t in ts) for side, ts in tiers.items()
    }
    ratios = round_ratios(tiers, "server_us_per_reading")
    return {
        **out,
        "means": {
            side: {
                "server_us_per_reading": server[side],
                "us_per_reading": {
                    g: statistics.fmean(t["us_per_reading"][g] for t in ts) for g in SERVER
                },
            }
            for side, ts in tiers.items()
        },
        "ratio": server["current"] / server["baseline"],
        "median_round_ratio": statistics.median(ratios),
        "round_ratio_range": [min(ratios), max(ratios)],
    }


def _describe(checkout: Path) -> str:
    """The checkout's commit, for the report."""
    done = subprocess.run(
        ["git", "-C", str(checkout), "log", "-1", "--format=%h %s"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return done.stdout.strip()[:100] or str(checkout)
