"""`meterproof api`: the HTTP API (docs/api.md)."""

from __future__ import annotations

import asyncio
import os

import click
from pydantic import ValidationError

from meterproof.api.settings import ApiSettings
from meterproof.cli.options import load_settings
from meterproof.config import invalid_settings


@click.command()
@click.option("--host", default=None, help="Listen address (setting api_host, 127.0.0.1).")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=None, help="HTTPS port (api_port, 8443)."
)
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    envvar="METERPROOF_CONFIG",
    help="TOML file of settings (docs/api.md).",
)
def api(host: str | None, port: int | None, config: str | None) -> None:
    """Serve the HTTP API over HTTPS (TLS 1.3, the operator CA's server certificate).

    Settings come from METERPROOF_* variables, .run/stack.env and --config; submitted
    readings are judged by the same rules as the ingest workers'. OpenAPI at /openapi.json,
    interactive docs at /docs.
    """
    if config:
        os.environ["METERPROOF_CONFIG"] = config
    settings = load_settings(ApiSettings, api_host=host, api_port=port)
    try:
        settings.ingest_settings()
    except ValidationError as exc:
        raise click.ClickException(invalid_settings(exc)) from None
    from meterproof.api.server import serve

    asyncio.run(serve(settings))
