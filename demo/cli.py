"""`meterproof demo` (also `make demo`)."""

from __future__ import annotations

from pathlib import Path

import click

from meterproof.demo.run import DemoOptions, run_demo
from meterproof.stack.cli import run_dir_option


@click.command()
@click.option(
    "--meters",
    type=click.IntRange(1, 5000),
    default=100,
    show_default=True,
    help="Simulated meters, issued and registered for this run.",
)
@click.option(
    "--readings",
    type=click.IntRange(1, 1000),
    default=6,
    show_default=True,
    help="Readings per meter.",
)
@click.option(
    "--interval",
    type=click.FloatRange(0.1, 600),
    default=5.0,
    show_default=True,
    help="Seconds between one meter's readings.",
)
@click.option(
    "--misbehave",
    type=click.FloatRange(0, 1),
    default=0.05,
    show_default=True,
    help="Share of meters sending bad signatures, replays, skewed clocks, rollbacks.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 8),
    default=2,
    show_default=True,
    help="Ingest worker processes (each with its own certificate, ingest-<n>).",
)
@click.option(
    "--epoch",
    "epoch_s",
    type=click.IntRange(1, 900),
    default=10,
    show_default=True,
    help="Bridge epoch length in seconds (production default: 900).",
)
@click.option(
    "--sink",
    type=click.Choice(["local", "evm"]),
    default="local",
    show_default=True,
    help="Ledger: the PostgreSQL ledger, or GRID contracts on a local EVM dev node (ganache).",
)
@run_dir_option
def demo(  # noqa: PLR0917 - click passes each option as a parameter
    meters: int, readings: int, interval: float, misbehave: float, workers: int,
         epoch_s: int, sink: str, run_dir: Path) -> None:  # fmt: skip
    """Run the whole path locally and print what happened.

    Starts (or reuses) the local stack, creates the PKI, starts ingest workers and the
    ledger bridge, runs a simulated fleet with a few misbehaving meters, waits for the
    bridge to anchor everything, and prints a summary with a Merkle proof checked end to
    end. No Docker needed.
    """
    options = DemoOptions(meters, readings, interval, misbehave, workers, epoch_s, run_dir, sink)
    raise SystemExit(run_demo(options, click.echo))
