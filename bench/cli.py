"""`meterproof bench`: benchmark suites, bounded in time, with progress on stderr."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from bench import report
from bench.machine import describe


def _progress(line: str) -> None:
    click.echo(line, err=True)


@click.group(invoke_without_command=True)
@click.option("--quick", is_flag=True, help="Smaller runs (about two minutes in all).")
@click.pass_context
def bench(ctx: click.Context, quick: bool) -> None:
    """Measure the pipeline against this machine's raw limits; writes docs/benchmarks.md.

    Without a subcommand, every suite runs.
    """
    ctx.obj = {"quick": quick}
    if ctx.invoked_subcommand is None:
        ctx.invoke(ingest)
        ctx.invoke(bridge)


@bench.command()
@click.option(
    "--readings",
    type=click.IntRange(1_000, 1_000_000),
    default=None,
    help="Backlog size (default 100,000; 20,000 with --quick).",
)
@click.option(
    "--workers",
    "worker_counts",
    type=click.IntRange(1, 8),
    multiple=True,
    help="Worker process counts to run (default: 1 and 2).",
)
@click.pass_context
def ingest(ctx: click.Context, readings: int | None, worker_counts: tuple[int, ...]) -> None:
    """Backlog drain with 1 and 2 workers next to the count-only receive rate."""
    from bench.ingest import run_drain

    quick = bool(ctx.obj and ctx.obj.get("quick"))
    size = readings or (20_000 if quick else 100_000)
    runs = []
    for workers in worker_counts or (1, 2):
        _progress(f"== backlog drain: {size:,} readings, {workers} worker(s)")
        with tempfile.TemporaryDirectory(prefix="meterproof-bench-") as tmp:
            Path(tmp).chmod(0o755)  # PostgreSQL runs as its own unprivileged user
            result = run_drain(
                run_dir=Path(tmp), readings=size, workers=workers, progress=_progress
            )
        _progress(
            f"   {result.drain_per_s:,.0f} readings/s stored+acked "
            f"({result.ratio_to_count_only:.0%} of count-only {result.count_only_per_s:,.0f}/s)"
        )
        runs.append(result.as_dict())
    saved = report.save("ingest", describe(), {"runs": runs})
    click.echo(f"raw results: {saved}\nreport: {report.render()}")


@bench.command()
@click.option(
    "--readings",
    type=click.IntRange(10_000, 5_000_000),
    default=None,
    help="Readings in the epoch (default 1,000,000; 100,000 with --quick).",
)
@click.pass_context
def bridge(ctx: click.Context, readings: int | None) -> None:
    """Seal + anchor of one epoch, and `ledger verify` of all of it, on a private database."""
    from dataclasses import asdict

    from bridge.bench import bench_bridge
    from schemas.migrate import migrate
    from stack.postgres import PostgresServer

    quick = bool(ctx.obj and ctx.obj.get("quick"))
    size = readings or (100_000 if quick else 1_000_000)
    _progress(f"== bridge: seal, anchor and verify an epoch of {size:,} readings")
    with tempfile.TemporaryDirectory(prefix="meterproof-bench-") as tmp:
        Path(tmp).chmod(0o755)  # PostgreSQL runs as its own unprivileged user
        server = PostgresServer(directory=Path(tmp))
        server.start()
        try:
            migrate(server.url)
            result = bench_bridge(server.url, readings=size, meters=min(10_000, size // 10))
        finally:
            server.stop()
    figures = {**asdict(result), "seal_and_anchor_s": result.seal_and_anchor_s}
    _progress(
        f"   seal+anchor {result.seal_and_anchor_s:.1f} s, ledger verify {result.verify_s:.1f} s"
    )
    saved = report.save("bridge", describe(), figures)
    click.echo(f"raw results: {saved}\nreport: {report.render()}")
