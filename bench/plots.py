"""PNG plots for docs/benchmarks.md, drawn only from the saved JSON of each suite (so a plot
never shows a figure the report does not), with matplotlib's Agg backend (no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from meterproof.bench.sampling import rates

DRAIN_TARGET: Final = 22_000


def _save(fig: Any, out_dir: Path, name: str) -> Path:  # noqa: ANN401 - matplotlib's Figure
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_over_time(runs: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """Readings stored + acknowledged per second during each drain, from the running count
    of stored readings the drain polled."""
    with_samples = [r for r in runs if r.get("samples")]
    if not with_samples:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for run in with_samples:
        points = rates([(float(t), int(n)) for t, n in run["samples"]], window_s=1.0)
        if points:
            label = f"{run['workers']} worker(s): {run['drain_per_s']:,.0f}/s overall"
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label)
    ax.axhline(DRAIN_TARGET, linestyle="--", color="grey", label="target 22,000/s")
    ax.set_xlabel("seconds since the workers were started")
    ax.set_ylabel("readings stored + acked / s (1 s windows)")
    ax.set_title("Backlog drain: throughput over time")
    ax.set_ylim(bottom=0)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, out_dir, "bench-throughput.png")


def latency_percentiles(tiers: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    """Publish -> receipt latency p50 / p95 / p99 per sustained tier (log scale)."""
    measured = [t for t in tiers if t.get("latency_ms")]
    if not measured:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.25
    xs = range(len(measured))
    for i, q in enumerate(("p50", "p95", "p99")):
        ax.bar(
            [x + (i - 1) * width for x in xs],
            [t["latency_ms"][q] for t in measured],
            width,
            label=q,
        )
    ax.set_xticks(list(xs), [f"{t['offered_per_s']:,}/s" for t in measured])
    ax.set_yscale("log")
    ax.set_xlabel("offered readings / s")
    ax.set_ylabel("publish -> receipt, ms")
    ax.set_title("Sustained load: latency percentiles per tier")
    ax.legend()
    return _save(fig, out_dir, "bench-latency.png")


def scaling(
    drain_runs: Sequence[dict[str, Any]], tiers: Sequence[dict[str, Any]], out_dir: Path
) -> Path | None:
    """Left: drain rate by worker count next to the count-only receive rate. Right: offered
    vs accepted rate per sustained tier (on the diagonal = keeping up)."""
    if not drain_runs and not tiers:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if drain_runs:
        labels = [str(r["workers"]) for r in drain_runs]
        left.bar(labels, [r["drain_per_s"] for r in drain_runs], label="stored + acked /s")
        left.plot(
            labels,
            [r["count_only_per_s"] for r in drain_runs],
            "o",
            color="black",
            label="count-only receive /s (same run)",
        )
        left.axhline(DRAIN_TARGET, linestyle=":", color="grey", label="target 22,000/s")
        left.set_xlabel("worker processes")
        left.set_ylabel("readings / s")
        left.set_title("Backlog drain by worker count")
        left.legend(fontsize="small")
    if tiers:
        offered = [t["offered_per_s"] for t in tiers]
        right.plot(offered, offered, ":", color="grey", label="offered = accepted")
        right.plot(offered, [t["accepted_per_s"] for t in tiers], "o-", label="accepted /s")
        right.set_xlabel("offered readings / s")
        right.set_ylabel("accepted readings / s")
        right.set_title("Sustained tiers: offered vs accepted")
        right.legend(fontsize="small")
    return _save(fig, out_dir, "bench-scaling.png")
