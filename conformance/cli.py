"""`meterproof conformance`: check a meter, or a capture of its payloads, against the wire
spec (docs/spec/reading-v1.md); docs/conformance.md explains each check.

Exit status: 0 every check passed, 1 a check failed or could not run, 2 bad arguments.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import click

from meterproof.certs.layout import check_identity
from meterproof.cli.errors import Group
from meterproof.conformance.capture import key_for, load_capture
from meterproof.conformance.checks import Verdict, run_checks
from meterproof.conformance.explain import markdown
from meterproof.conformance.kit import MeterCommand, Phases, VendorKey, run_meter
from meterproof.conformance.report import as_json, as_table, passed
from meterproof.conformance.vendor import VendorIdentity
from meterproof.errors import InputError
from meterproof.schemas.codec import MalformedPayload, decode_reading
from meterproof.schemas.reading import Alg

#: The phases' defaults, declared once in `Phases`.
_DEFAULT: Final = Phases()

_ALGS = click.Choice([a.value for a in Alg])


def _identity(value: str) -> str:
    try:
        return check_identity(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _report(verdicts: Sequence[Verdict], *, json_out: bool, **context: object) -> None:
    click.echo(as_json(verdicts, **context) if json_out else as_table(verdicts))
    if not passed(verdicts):
        failed = ", ".join(v.check for v in verdicts if not v.passed)
        click.echo(f"not conformant: {failed}", err=True)
        sys.exit(1)


@click.group(cls=Group)
def conformance() -> None:
    """Does a meter follow the wire spec? A verdict per check (docs/conformance.md)."""


@conformance.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--public-key",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The meter's signing public key, PEM SubjectPublicKeyInfo.",
)
@click.option(
    "--alg", type=_ALGS, help="The key's algorithm  [default: from the key; RSA needs it]"
)
@click.option("--meter-id", help="The meter these payloads must name (and be published as).")
@click.option("--json", "json_out", is_flag=True, help="Print the report as JSON.")
def capture(
    *, directory: Path, public_key: Path, alg: str | None, meter_id: str | None, json_out: bool
) -> None:
    """Check captured payloads: one PUBLISH payload per file in DIRECTORY, in name order.

    Checks strict JSON, signing bytes, algorithm and key binding, and seq/ts behaviour;
    the session checks need a live meter (`conformance meter`).
    """
    key = key_for(public_key.read_bytes(), Alg(alg) if alg else None)
    obs = load_capture(directory, key, meter_id)
    _report(run_checks(obs), json_out=json_out, mode="capture", payloads=len(obs.published))


@conformance.command()
@click.option(
    "--command",
    "command",
    required=True,
    help="The shell command that starts the meter (see the variables above).",
)
@click.option(
    "--meter-id",
    callback=lambda _c, _p, v: v if v is None else _identity(v),
    help="The meter's id  [default: a fresh conformance-<hex>]",
)
@click.option("--alg", type=_ALGS, default="EdDSA", show_default=True, help="Of the issued key.")
@click.option(
    "--public-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The meter's own signing public key (PEM), instead of a key the kit issues.",
)
@click.option(
    "--vendor-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The meter's own TLS certificate (PEM) from the vendor's CA, instead of one the "
    "kit issues; its CN is the meter id.",
)
@click.option(
    "--vendor-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The vendor's CA certificate(s), PEM: the private broker trusts them for this run.",
)
@click.option(
    "--vendor-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The TLS private key of --vendor-cert, only if the meter command needs the kit to "
    "hand it over (METERPROOF_CONFORMANCE_KEY); a meter that holds its own leaves it out.",
)
@click.option(
    "--normal",
    type=click.FloatRange(min=1),
    default=_DEFAULT.normal_s,
    show_default=True,
    help="Seconds of normal operation, receipts flowing.",
)
@click.option(
    "--silence",
    type=click.FloatRange(min=0),
    default=_DEFAULT.silence_s,
    show_default=True,
    help="Seconds without receipts; the meter must republish (0: skip).",
)
@click.option(
    "--outage",
    type=click.FloatRange(min=0),
    default=_DEFAULT.outage_s,
    show_default=True,
    help="Seconds the broker is down; reconnects are counted (0: skip).",
)
@click.option(
    "--power-cut",
    type=click.FloatRange(min=0),
    default=_DEFAULT.power_cut_s,
    show_default=True,
    help="Seconds without receipts before the meter command is killed (SIGKILL) and started "
    "again on the same state dir; its outbox and seq must survive (0: skip).",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=1),
    default=_DEFAULT.connect_timeout_s,
    show_default=True,
    help="Seconds to wait for the first reading.",
)
@click.option(
    "--reconnect-wait",
    type=click.FloatRange(min=1),
    default=_DEFAULT.reconnect_wait_s,
    show_default=True,
    help="Seconds to wait for the meter after the outage.",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the PKI, broker log and meter output here  [default: a temporary folder]",
)
@click.option(
    "--keep-database",
    is_flag=True,
    help="Keep the run's PostgreSQL cluster (stopped) to look at what the worker stored; "
    "use with --run-dir.",
)
@click.option("--json", "json_out", is_flag=True, help="Print the report as JSON.")
def meter(
    *,
    command: str,
    meter_id: str | None,
    alg: str,
    public_key: Path | None,
    vendor_cert: Path | None,
    vendor_ca: Path | None,
    vendor_key: Path | None,
    normal: float,
    silence: float,
    outage: float,
    power_cut: float,
    connect_timeout: float,
    reconnect_wait: float,
    run_dir: Path | None,
    keep_database: bool,
    json_out: bool,
) -> None:
    """Run a meter against a private stack and judge what it does.

    The kit creates a private CA, issues the meter's TLS identity (or accepts the vendor's:
    --vendor-cert, --vendor-ca, checked first and refused with a named reason, e.g.
    vendor_cert_untrusted) and a signing key (unless --public-key names the meter's own),
    starts a PostgreSQL cluster of its own and registers the meter there with its key,
    starts Mosquitto with our TLS config on a free loopback port and one real ingest
    worker, and runs COMMAND with these variables set:

    \b
      METERPROOF_CONFORMANCE_MQTT_HOST, _MQTT_PORT   the broker (mutual TLS 1.3)
      METERPROOF_CONFORMANCE_CA_CERT                 the CA to trust (PEM)
      METERPROOF_CONFORMANCE_CERT, _KEY              the meter's TLS certificate and key
                                                     (_KEY unset: --vendor-cert without key)
      METERPROOF_CONFORMANCE_METER_ID                its meter_id (the certificate's CN)
      METERPROOF_CONFORMANCE_ALG                     the signing algorithm
      METERPROOF_CONFORMANCE_SIGNING_KEY             the issued signing key (PKCS#8 PEM),
                                                     unset with --public-key
      METERPROOF_CONFORMANCE_STATE_DIR               a folder for the meter's state
      METERPROOF_STACK_ENV                           the same, for the reference meter

    Then: normal operation (--normal), receipts withheld by pausing the worker
    (--silence), the broker down (--outage) and back, and a power cut (--power-cut):
    receipts withheld, the command killed and started again. The database is deleted at
    the end unless --keep-database. Progress goes to stderr, the report to stdout.

    \b
    The reference meter, for comparison:
      --command 'python -P -m meterproof meter run --meter-id "$METERPROOF_CONFORMANCE_METER_ID"
                 --interval 1 --republish-after 2 --state-dir "$METERPROOF_CONFORMANCE_STATE_DIR"'
    """
    vendor = None
    if public_key is not None:
        vendor = VendorKey(public_key.read_bytes(), key_for(public_key.read_bytes(), Alg(alg)).alg)
    try:
        phases = Phases(
            connect_timeout_s=connect_timeout,
            normal_s=normal,
            silence_s=silence,
            outage_s=outage,
            power_cut_s=power_cut,
            reconnect_wait_s=reconnect_wait,
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if (vendor_cert is None) != (vendor_ca is None) or (vendor_key and not vendor_cert):
        raise InputError("--vendor-cert and --vendor-ca go together; --vendor-key needs them")
    identity = None if vendor_cert is None or vendor_ca is None else VendorIdentity(
        vendor_cert, vendor_ca, vendor_key
    )  # fmt: skip
    spec = MeterCommand(command, meter_id=meter_id, key=vendor, alg=Alg(alg), identity=identity)

    def progress(line: str) -> None:
        click.echo(f"conformance: {line}", err=True)

    if keep_database and run_dir is None:
        raise InputError("--keep-database needs --run-dir: a temporary folder is deleted")
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        obs = run_meter(
            spec, run_dir=run_dir, phases=phases, progress=progress, keep_database=keep_database
        )
    else:
        with tempfile.TemporaryDirectory(prefix="meterproof-conformance-") as tmp:
            obs = run_meter(spec, run_dir=Path(tmp), phases=phases, progress=progress)
    _report(
        run_checks(obs),
        json_out=json_out,
        mode="meter",
        meter_id=obs.meter_id,
        readings_received=len(obs.published),
        readings_stored=obs.stored,
    )


@conformance.command()
@click.argument("payload", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def explain(*, payload: Path) -> None:
    """Print the signing bytes of one payload file field by field, and its reading_hash."""
    try:
        reading = decode_reading(payload.read_bytes())
    except MalformedPayload as exc:
        raise InputError(f"{payload}: malformed: {exc}") from None
    click.echo(markdown(reading))
