"""Options that several command groups share, defined once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import ValidationError

from meterproof.config import (
    DEFAULT_PKI_ROOT,
    Settings,
    StackEnv,
    invalid_settings,
    libpq_parsable,
    stack_env_file,
)
from meterproof.errors import first_line

F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S", bound=Settings)

pki_root_option = click.option(
    "--pki-root",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="METERPROOF_PKI_ROOT",
    default=DEFAULT_PKI_ROOT,
    show_default=True,
    help="Folder of the operator PKI.",
)

stack_env_option = click.option(
    "--stack-env",
    type=click.Path(dir_okay=False, path_type=Path),
    default=stack_env_file,
    show_default=".run/stack.env, or $METERPROOF_STACK_ENV",
    help="The running stack's addresses (broker, PKI folder, database); if the file is "
    "absent there is no running stack. METERPROOF_* variables win over it.",
)


def load_settings(cls: type[S], **overrides: Any) -> S:  # noqa: ANN401 - click option values
    """Command-line values (None: not given) win over the environment, `.run/stack.env`
    and the TOML file; an invalid value is one line naming the setting."""
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise click.ClickException(invalid_settings(exc)) from None


def database_option(command: F) -> F:
    return click.option(
        "--database-url",
        envvar="METERPROOF_DATABASE_URL",
        callback=_parsable_url,
        help="PostgreSQL URL [env METERPROOF_DATABASE_URL; default: the running stack's].",
    )(command)


def _parsable_url(_ctx: click.Context, _param: click.Parameter, url: str | None) -> str | None:
    """A URL libpq cannot parse is bad input (exit 2), not an unreachable database."""
    try:
        return None if url is None else libpq_parsable(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@contextmanager
def connect_database(database_url: str | None) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to `database_url` or the running stack's database."""
    url = database_url or StackEnv.load().database_url
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        raise click.ClickException(
            f"database unreachable at {_where(url)}: {first_line(exc)}"
        ) from None
    with conn:
        yield conn


def _where(url: str) -> str:
    """host:port/dbname, without a password the URL may carry."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return "the given URL (unparsable)"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
