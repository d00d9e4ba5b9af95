"""`meterproof simulate` (a fleet) and `meterproof meter run` (one reference meter).

Errors are one line on stderr, never a traceback. Exit status of both: 0 every reading
receipted (as intended), 1 a receipt the meter did not intend (simulate only), 2 bad
arguments, 3 readings still unreceipted after --receipt-timeout.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import click
import structlog
from click.decorators import FC

from meterproof.certs.layout import PkiLayout, check_identity
from meterproof.cli.errors import Group, one_line
from meterproof.cli.options import stack_env_option
from meterproof.config import StackEnv
from meterproof.errors import MeterproofError
from meterproof.meter.client import DEFAULT_KEEPALIVE_S, Broker, ClientSettings
from meterproof.meter.fleet import issue_fleet, parse_alg_mix, pki_fleet
from meterproof.meter.identity import MeterIdentity
from meterproof.meter.registry import register_command, stack_registrar
from meterproof.meter.run import run_meter
from meterproof.meter.simulate import EXIT_UNRECEIPTED, FleetConfig, Progress, run_simulation
from meterproof.registry.model import default_kid
from meterproof.schemas.reading import b64url

log = structlog.get_logger("meter.cli")
DEFAULT_FLEET = 100

_state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Seq state and outbox per meter [default: <run dir>/meters].",
)
_receipt_timeout_option = click.option(
    "--receipt-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the last receipts once every reading is sent.",
)


def _republish_after_option(default: float) -> Callable[[FC], FC]:
    return click.option(
        "--republish-after",
        type=click.FloatRange(min=0, min_open=True),
        default=default,
        show_default=True,
        help="Republish a reading with no receipt this many seconds after the broker took "
        "it (doubling per attempt; the ingest side deduplicates).",
    )


@contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except (MeterproofError, OSError) as exc:
        raise one_line(exc) from exc
    except ValueError as exc:  # a bad option value
        raise click.ClickException(str(exc)) from exc


def _meter_id(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return check_identity(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command()
@click.option(
    "--meters",
    type=click.IntRange(min=1),
    help=f"Fleet size  [default: {DEFAULT_FLEET}; with --from-pki, every meter found]",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds between one meter's readings (start times are spread over the first).",
)
@click.option(
    "--readings", type=click.IntRange(min=1), default=6, show_default=True, help="Per meter."
)
@click.option(
    "--alg-mix",
    default="EdDSA=1",
    show_default=True,
    help='Signature algorithms of newly issued meters, e.g. "EdDSA=0.8,ES256=0.2".',
)
@click.option(
    "--misbehave",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Share of meters that send a bad reading every other time: a bad signature, "
    "a replay, a reused seq, a skewed clock or a rolled-back register.",
)
@click.option(
    "--from-pki",
    is_flag=True,
    help="Use the meters already in the PKI folder (registered beforehand) instead of "
    "issuing new ones.",
)
@click.option(
    "--register/--no-register",
    default=True,
    show_default=True,
    help="Register newly issued meters in the stack's registry before they report.",
)
@_receipt_timeout_option
@_republish_after_option(15.0)
@click.option(
    "--keepalive",
    type=click.IntRange(min=5, max=65535),
    default=DEFAULT_KEEPALIVE_S,
    show_default=True,
    help="MQTT keepalive in seconds: a broker that sends nothing this long is pinged, and "
    "one that answers nothing for as long again (its machine paused or cut off) is left "
    "for the next broker of the list.",
)
@_state_dir_option
@click.option("--seed", type=int, help="Reproducible start offsets, noise and misbehavers.")
@click.option(
    "--progress-every",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds between progress lines.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@stack_env_option
def simulate(
    *,
    meters: int | None,
    interval: float,
    readings: int,
    alg_mix: str,
    misbehave: float,
    from_pki: bool,
    register: bool,
    receipt_timeout: float,
    republish_after: float,
    keepalive: int,
    state_dir: Path | None,
    seed: int | None,
    progress_every: float,
    as_json: bool,
    stack_env: Path,
) -> None:
    """Run a fleet of simulated meters against the stack, then summarise the receipts.

    Every meter reads at --interval from its household curve (consumers import,
    prosumers export around their local midday; the fleet spans all time zones), keeps
    each reading until its receipt arrives and republishes it if none comes. Newly
    issued meters get an owner wallet each. Progress goes to stdout (stderr with --json).

    \b
    Exit status: 0 every reading receipted as intended; 1 a receipt the meter did not
    intend (an honest reading rejected, e.g. unknown_meter, or a bad one accepted);
    3 readings unreceipted after --receipt-timeout (is an ingest worker running?).
    """
    env = StackEnv.load(stack_env)
    layout = PkiLayout(env.pki_root)
    with _one_line_errors():
        mix = parse_alg_mix(alg_mix)
        config = FleetConfig(
            interval_s=interval,
            readings=readings,
            misbehave=misbehave,
            receipt_timeout_s=receipt_timeout,
            republish_after_s=republish_after,
            keepalive_s=keepalive,
            progress_every_s=progress_every,
            seed=seed,
        )
        if from_pki:
            identities = pki_fleet(layout, meters)
            click.echo(
                f"{len(identities)} meters from {layout.devices_dir} (registered beforehand)",
                err=as_json,
            )
        else:
            identities, csv_path = issue_fleet(layout, meters or DEFAULT_FLEET, mix)
            click.echo(f"issued {len(identities)} meters; summary {csv_path}", err=as_json)
            if register:
                count = stack_registrar(env.database_url)(csv_path)
                click.echo(f"registered {count} meters", err=as_json)
            else:
                click.echo(f"not registered: run `{register_command(csv_path)}`", err=as_json)

        def show(progress: Progress) -> None:
            click.echo(progress.line(), err=as_json)

        summary = run_simulation(
            identities,
            broker=Broker.from_env(env),
            state_root=state_dir or env.run_dir / "meters",
            config=config,
            on_progress=show,
        )
    log.info("simulate.summary", **summary.to_dict())
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
    else:
        click.echo("\n".join(summary.lines()))
    sys.exit(summary.exit_code)


@click.group(cls=Group)
def meter() -> None:
    """One reference meter (the client firmware would run)."""


@meter.command("run")
@click.option("--meter-id", required=True, callback=_meter_id, help="A meter of the PKI folder.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds between readings.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    help="Stop after this many readings  [default: run until interrupted]",
)
@_receipt_timeout_option
@_republish_after_option(30.0)
@_state_dir_option
@stack_env_option
def run(
    *,
    meter_id: str,
    interval: float,
    count: int | None,
    receipt_timeout: float,
    republish_after: float,
    state_dir: Path | None,
    stack_env: Path,
) -> None:
    """Read plausible registers every --interval seconds, sign and publish them.

    A restart on the same --state-dir continues the seq and republishes whatever is
    still unreceipted.
    """
    env = StackEnv.load(stack_env)
    with _one_line_errors():
        identity = MeterIdentity.load(PkiLayout(env.pki_root).device(meter_id))
        stats, unreceipted = asyncio.run(
            run_meter(
                identity,
                broker=Broker.from_env(env),
                state_dir=(state_dir or env.run_dir / "meters") / meter_id,
                interval_s=interval,
                count=count,
                receipt_timeout_s=receipt_timeout,
                settings=ClientSettings(republish_after_s=republish_after),
            )
        )
    rejected = ", ".join(f"{r} {n}" for r, n in sorted(stats.rejected.items())) or "none"
    click.echo(
        f"meter {meter_id}: sent {stats.submitted}, accepted {stats.accepted}, "
        f"duplicate {stats.duplicate}, rejected {stats.rejected.total()} ({rejected}), "
        f"unreceipted {unreceipted}"
    )
    sys.exit(EXIT_UNRECEIPTED if unreceipted else 0)


@meter.command("sign-document")
@click.argument("document", type=click.File("rb"))
@click.option("--meter-id", required=True, callback=_meter_id, help="A meter of the PKI folder.")
@stack_env_option
def sign_document(*, document: BinaryIO, meter_id: str, stack_env: Path) -> None:
    """Sign a meterproof document (from `meters link-wallet`) with the meter's reading key.

    This is the meter's half of a wallet link: firmware (or a P1 reader) signs the exact
    UTF-8 bytes with the key it signs readings with. The base64url signature goes to
    stdout; the key id to pass as --kid goes to stderr.
    """
    data = document.read()  # bytes, as read: a text read would turn CRLF into LF
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise click.ClickException(
            f"the document is not UTF-8 text (byte {exc.start} cannot be decoded)"
        ) from exc
    if not data.startswith(b"meterproof "):
        raise click.ClickException("not a meterproof document (it starts 'meterproof ')")
    env = StackEnv.load(stack_env)
    with _one_line_errors():
        identity = MeterIdentity.load(PkiLayout(env.pki_root).device(meter_id))
    click.echo(b64url(identity.key.sign(data)))
    click.echo(f"--kid {default_kid(identity.key.public_key().pem())}", err=True)
