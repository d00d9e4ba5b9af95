"""`meterproof chaos` (also `make chaos`)."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import click

#: Where the full campaign's figures go; a --quick run writes elsewhere unless told, so it
#: never replaces the full campaign's report.
FULL_REPORT = Path("docs/reliability.md")
QUICK_REPORT = Path(".run/reliability-quick.md")
#: The same for the campaign on the Patroni cluster (`--ha`), which has faults of its own.
HA_FULL_REPORT = Path("docs/reliability-ha.md")
HA_QUICK_REPORT = Path(".run/reliability-ha-quick.md")


@click.command()
@click.option("--quick", is_flag=True, help="Every fault kind at least once, within 3 minutes.")
@click.option(
    "--ha",
    is_flag=True,
    help="The stack without a single point of failure (`stack up --ha`: PostgreSQL as a "
    "Patroni cluster, two brokers): kill -9 of the primary, a paused primary, a "
    "switchover, an etcd member lost, a frozen standby, a broker lost and a paused broker "
    f"instead of the PostgreSQL stop [--quick: 5 minutes; report {HA_FULL_REPORT}, --quick "
    f"{HA_QUICK_REPORT}].",
)
@click.option(
    "--duration",
    type=click.FloatRange(60, 3600),
    default=None,
    help="Time bound in seconds, everything included [default: 900; --quick 180].",
)
@click.option("--seed", type=int, default=1, show_default=True, help="Fault order and moments.")
@click.option(
    "--meters", type=click.IntRange(1, 5000), default=None, help="Fleet size [300; --quick 100]."
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"Markdown report [default: {FULL_REPORT}; --quick {QUICK_REPORT}].",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the stack's data, logs and the meters' state here [default: a temporary dir, "
    "removed afterwards].",
)
def chaos(
    *,
    quick: bool,
    ha: bool,
    duration: float | None,
    seed: int,
    meters: int | None,
    report: Path | None,
    work_dir: Path | None,
) -> None:
    """Fault campaign on loopback: kill -9 ingest workers, the broker and the bridge, restart
    the broker, stop PostgreSQL and Redis, all under a steady simulated load; then audit that
    every generated reading was stored exactly once and anchored exactly once, that
    `ledger verify` passes and that minted totals follow the registers.

    Progress goes to stderr; the figures to the report. Exit status 0 when the audit is
    clean, 1 on any loss, duplicate, unanchored reading, mint mismatch or verify failure,
    or a planned fault that did not happen (skipped, a kill or stop that found its process
    already down, no standby to freeze, a bridge that never reached its crash point) or
    was not recovered within the recovery timeout (a primary kill with no reading stored
    after it, a paused primary with none stored while it was paused, a lost or paused
    broker after which not every meter came through the other).
    """
    from meterproof.chaos.campaign import run_campaign
    from meterproof.chaos.plan import PlanError, full_config, make_plan, quick_config
    from meterproof.chaos.report import write

    changes: dict[str, object] = {"seed": seed}
    if duration is not None:
        changes["duration_s"] = duration
    if meters is not None:
        changes["meters"] = meters
    try:
        config = (quick_config if quick else full_config)(ha=ha, **changes)
        make_plan(config)
    except (PlanError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    began = time.monotonic()

    def say(line: str) -> None:
        click.echo(f"{time.monotonic() - began:6.1f}s  {line}", err=True)

    keep = work_dir is not None
    root = work_dir or Path(tempfile.mkdtemp(prefix="meterproof-chaos-"))
    try:
        result = run_campaign(config, work_dir=root, say=say)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    defaults = (HA_QUICK_REPORT, HA_FULL_REPORT) if ha else (QUICK_REPORT, FULL_REPORT)
    path = report or defaults[0 if quick else 1]
    command = "meterproof chaos" + (" --ha" if ha else "") + (" --quick" if quick else "")
    write(result, path, command=command)
    say(f"report: {path}")
    for problem in result.problems():
        say(f"FAILED: {problem}")
    if result.ok:
        say(f"PASSED in {result.elapsed_s:.0f} s (bound {config.duration_s:.0f} s)")
    sys.exit(0 if result.ok else 1)
