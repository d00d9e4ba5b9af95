"""Before and after, on one machine: backlog drains of two checkouts, alternated.

A shared machine's speed moves by tens of percent from minute to minute, so a figure
from yesterday says little about today's change. Here each round drains the same backlog
with the baseline checkout and then with this one, each through its own `meterproof
bench ingest` (its own venv, so each side runs its own code), in a fresh temporary folder
so neither writes into a checkout. The ratio of the means is the comparison; the median of
the rounds' ratios, and the load average before each run, show how much the machine's
other work moved it.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meterproof.errors import InputError, MeterproofError

_RESULT = re.compile(r"raw results: (\S+\.json)")


def command_of(checkout: Path) -> Path:
    """The checkout's own `meterproof`, from its venv."""
    command = checkout / ".venv" / "bin" / "meterproof"
    if not command.is_file():
        raise InputError(
            f"{command} is missing: give the checkout a venv "
            "(python3 -m venv .venv && .venv/bin/pip install -e '.[test]')"
        )
    return command


def drain_once(command: Path, *, readings: int, workers: int, timeout_s: float) -> dict[str, Any]:
    """One `bench ingest` drain in a fresh folder; its run's figures."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERPROOF_")}
    with tempfile.TemporaryDirectory(prefix="meterproof-compare-") as tmp:
        argv = [str(command), "bench", "ingest", "--readings", str(readings),
                "--workers", str(workers), "--no-profile"]  # fmt: skip
        done = subprocess.run(
            argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        found = _RESULT.search(done.stderr + done.stdout)
        if done.returncode or found is None:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise MeterproofError(f"{command} bench ingest failed ({done.returncode}): {tail[0]}")
        data = json.loads((Path(tmp) / found.group(1)).read_text())
    run: dict[str, Any] = data["figures"]["runs"][0]
    return {k: v for k, v in run.items() if k != "samples"}


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
) -> dict[str, Any]:
    """`rounds` x (baseline, current); the figures, each side's means and their ratio."""
    sides = {"baseline": command_of(baseline), "current": command_of(current)}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for i in range(1, rounds + 1):
        for side, command in sides.items():
            load = os.getloadavg()[0]  # what else the shared machine was doing
            run = drain_once(command, readings=readings, workers=workers, timeout_s=timeout_s)
            runs[side].append({**run, "load_1m_before": load})
            progress(
                f"   round {i}/{rounds} {side}: {run['drain_per_s']:,.0f} readings/s, "
                f"{run['cpu_us_per_reading']:.1f} µs worker CPU per reading"
            )
    means = {
        side: {
            "drain_per_s": statistics.fmean(r["drain_per_s"] for r in rs),
            "cpu_us_per_reading": statistics.fmean(r["cpu_us_per_reading"] for r in rs),
        }
        for side, rs in runs.items()
    }
    return {
        "label": label,
        "baseline": _describe(baseline),
        "current": _describe(current),
        "readings": readings,
        "workers": workers,
        "runs": runs,
        "means": means,
        "ratio": {
            key: means["current"][key] / means["baseline"][key]
            for key in ("drain_per_s", "cpu_us_per_reading")
        },
        "median_round_ratio": {
            key: statistics.median(
                c[key] / b[key] for b, c in zip(runs["baseline"], runs["current"], strict=True)
            )
            for key in ("drain_per_s", "cpu_us_per_reading")
        },
    }


def _describe(checkout: Path) -> str:
    """The checkout's commit, for the report."""
    done = subprocess.run(
        ["git", "-C", str(checkout), "log", "-1", "--format=%h %s"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return done.stdout.strip()[:100] or str(checkout)
