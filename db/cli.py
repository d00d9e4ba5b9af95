"""`meterproof db`: the PostgreSQL schema, from the command line."""

from __future__ import annotations

import click

from meterproof.cli.errors import Group
from meterproof.config import StackEnv
from meterproof.db.migrate import load_migrations, migrate


@click.group(cls=Group)
def db() -> None:
    """The PostgreSQL schema."""


@db.command("migrate")
@click.option(
    "--database-url",
    envvar="METERPROOF_DATABASE_URL",
    help="PostgreSQL URL [env METERPROOF_DATABASE_URL; default: the running stack's].",
)
def migrate_command(database_url: str | None) -> None:
    """Apply pending migrations and print the versions applied; safe to re-run."""
    applied = migrate(database_url or StackEnv.load().database_url)
    if applied:
        click.echo("applied " + " ".join(applied))
    else:
        click.echo(f"up to date ({len(load_migrations())} migrations applied)")
