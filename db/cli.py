"""`meterproof db`: the PostgreSQL schema, its retention, its backups, from the command line."""

from __future__ import annotations

from pathlib import Path

import click

from meterproof.cli.errors import Group
from meterproof.cli.options import connect_database, database_option, load_settings
from meterproof.config import StackEnv
from meterproof.db.migrate import load_migrations, migrate


@click.group(cls=Group)
def db() -> None:
    """The PostgreSQL schema, retention and backups."""


@db.command("migrate")
@database_option
def migrate_command(database_url: str | None) -> None:
    """Apply pending migrations and print the versions applied; safe to re-run."""
    applied = migrate(database_url or StackEnv.load().database_url)
    if applied:
        click.echo("applied " + " ".join(applied))
    else:
        click.echo(f"up to date ({len(load_migrations())} migrations applied)")


@db.command("prune")
@database_option
@click.option(
    "--retain-days",
    type=int,
    help="Keep raw readings this many days: more than the workers' max_age_s + rate window"
    " + an hour (8 days by default) [env METERPROOF_RETAIN_DAYS; default 30].",
)
@click.option(
    "--chunk-rows",
    type=int,
    help="Rows deleted per transaction [env METERPROOF_PRUNE_CHUNK_ROWS; default 10000].",
)
def prune_command(
    database_url: str | None, retain_days: int | None, chunk_rows: int | None
) -> None:
    """Remove raw readings older than the retention window that the ledger has anchored:
    retire whole anchored batches in order (keeping each meter's watermark and the mint
    state `ledger verify` needs), delete their rows in chunks, drop empty old partitions.
    Readings not yet anchored are never removed. Rollups are kept. Safe to stop and
    re-run; run it daily (cron, a systemd timer)."""
    from meterproof.db.retention import RetentionSettings, horizon_for, prune

    settings = load_settings(
        RetentionSettings, retain_days=retain_days, prune_chunk_rows=chunk_rows
    )
    horizon = horizon_for(settings.retain_days)
    click.echo(f"pruning anchored readings older than {horizon:%Y-%m-%d %H:%M:%S} UTC")
    with connect_database(database_url) as conn:
        report = prune(
            conn, horizon=horizon, chunk_rows=settings.prune_chunk_rows, progress=click.echo
        )
    click.echo(
        f"done: {len(report.retired_batches)} batches retired ({report.retired_readings:,}"
        f" readings), {report.deleted_readings:,} readings and {report.deleted_log_rows:,}"
        f" reading_log rows deleted, {len(report.dropped_partitions)} partitions dropped;"
        f" {report.kept_older:,} older readings kept (not anchored yet, or in a batch with"
        " newer readings)"
    )


@db.command("backup")
@database_option
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    required=True,
    help="The archive to write (pg_dump custom format); replaced only once complete.",
)
def backup_command(database_url: str | None, out: Path) -> None:
    """Dump the whole database (readings, rollups, registry, ledger, migrations) as one
    consistent snapshot, while everything keeps running. Restore with `db restore`."""
    from meterproof.db.backup import backup

    result = backup(database_url or StackEnv.load().database_url, out)
    click.echo(
        f"backup written: {result.path} ({result.size_bytes / 2**20:.1f} MiB"
        f" in {result.seconds:.1f} s)"
    )


@db.command("restore")
@database_option
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
def restore_command(database_url: str | None, archive: Path) -> None:
    """Restore a `db backup` archive into an empty database (a fresh server or a new
    `createdb`), in one transaction: all of it or nothing. Then check it with
    `meterproof ledger verify --database-url ...`."""
    from meterproof.db.backup import restore

    seconds = restore(archive, database_url or StackEnv.load().database_url)
    click.echo(f"restored {archive} in {seconds:.1f} s")
