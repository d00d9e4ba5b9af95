"""`meterproof certs ...`: the operator's PKI commands.

Errors are one line on stderr with a non-zero exit (1 for a refused operation, 2 for a bad
argument), never a traceback. Private keys are written to files and never printed.
"""

from __future__ import annotations

import ipaddress
import string
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import click

from meterproof.certs import crl
from meterproof.certs.authority import CA_KEY_TYPES, CaKeyType
from meterproof.certs.bootstrap import (
    DEFAULT_CA_DAYS,
    DEFAULT_INGEST_WORKERS,
    DEFAULT_SERVER_NAMES,
    init_pki,
)
from meterproof.certs.bulk import (
    MAX_PREFIX,
    default_csv_path,
    issue_bulk,
    new_meter_ids,
    read_meter_ids,
    write_bulk_csv,
)
from meterproof.certs.errors import PkiError
from meterproof.certs.identities import (
    DEFAULT_DAYS,
    MAX_INGEST_INSTANCES,
    SERVICE_NAMES,
    IssuedDevice,
    ServiceName,
    issue_device,
    issue_ingest_workers,
    issue_integrator,
    issue_service,
    list_identities,
    load_identity,
)
from meterproof.certs.layout import PkiLayout, check_identity
from meterproof.cli.errors import Group
from meterproof.cli.options import pki_root_option, stack_env_option
from meterproof.schemas.reading import Alg
from meterproof.schemas.signatures import RSA_MAX_BITS, RSA_MIN_BITS

pass_layout = click.make_pass_decorator(PkiLayout)
_LABEL_CHARS = frozenset(string.ascii_letters + string.digits + "-")


@contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except ValueError as exc:  # a value a library refused (a key size, a date)
        raise click.ClickException(str(exc)) from exc


def _identity(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return check_identity(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _server_names(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> tuple[str, ...]:
    for value in values:
        if not (_is_ip(value) or all(_is_label(label) for label in value.split("."))):
            raise click.BadParameter(f"{value!r} is neither a DNS name nor an IP address")
    return values


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_label(label: str) -> bool:
    return 0 < len(label) <= 63 and set(label) <= _LABEL_CHARS


def _check_rsa_bits(alg: str, rsa_bits: int | None) -> int:
    if rsa_bits is not None and alg not in (Alg.RS256, Alg.PS256):
        raise click.UsageError("--rsa-bits applies to RS256 and PS256 only")
    return rsa_bits or RSA_MAX_BITS


_alg_option = click.option(
    "--alg",
    type=click.Choice([alg.value for alg in Alg]),
    default=Alg.EDDSA.value,
    show_default=True,
    help="Algorithm of the meter's reading-signing key (docs/spec/reading-v1.md section 4).",
)
_rsa_bits_option = click.option(
    "--rsa-bits",
    type=click.IntRange(RSA_MIN_BITS, RSA_MAX_BITS),
    help=f"RSA key size for RS256/PS256  [default: {RSA_MAX_BITS}]",
)
_days_option = click.option(
    "--days",
    type=click.IntRange(min=1),
    default=DEFAULT_DAYS,
    show_default=True,
    help="Certificate validity in days.",
)


@click.group(cls=Group)
@pki_root_option
@click.pass_context
def certs(ctx: click.Context, pki_root: Path) -> None:
    """Operator PKI: CA, broker and client certificates, signing keys, revocation."""
    ctx.obj = PkiLayout(pki_root)


@certs.command("init")
@click.option(
    "--ca-key",
    type=click.Choice(CA_KEY_TYPES),
    default="rsa4096",
    show_default=True,
    help="Key of a new root CA (it signs only the EC P-256 issuing CA).",
)
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    callback=_server_names,
    help=f"Extra DNS name or IP of the broker certificate (repeatable); "
    f"{' and '.join(DEFAULT_SERVER_NAMES)} are always included.",
)
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=DEFAULT_CA_DAYS,
    show_default=True,
    help="Validity of a new CA in days.",
)
@click.option(
    "--ingest-workers",
    type=click.IntRange(1, MAX_INGEST_INSTANCES),
    default=DEFAULT_INGEST_WORKERS,
    show_default=True,
    help="Ingest worker identities (ingest-0, ingest-1, ...) that must exist.",
)
@pass_layout
def init_cmd(
    layout: PkiLayout,
    ca_key: CaKeyType,
    server_names: tuple[str, ...],
    days: int,
    ingest_workers: int,
) -> None:
    """Create the CA, broker certificate, CRL, oracle key and service identities.

    Only what is missing is created: an existing CA is never replaced, so running this
    again is always safe. To reissue the broker certificate (say, with new --server-name
    values), move server/ away and run it again.
    """
    with _one_line_errors():
        result = init_pki(
            layout,
            ca_key=ca_key,
            server_names=server_names,
            days=days,
            ingest_workers=ingest_workers,
        )
    state = "created" if result.ca_created else "exists, left untouched"
    click.echo(f"CA: {state} ({result.ca_key} root, EC P-256 issuing CA): {layout.ca_cert}")
    state = "created" if result.server_created else "exists"
    click.echo(f"broker certificate: {state}: {layout.server_cert}")
    click.echo(f"CRL: {'signed' if result.crl_written else 'current'}: {layout.crl}")
    click.echo(
        f"oracle key: {'created' if result.oracle_created else 'exists'}: {layout.oracle_pub}"
    )
    issued = ", ".join(result.services_created) or "none (all exist)"
    click.echo(f"service identities issued: {issued}")


@certs.command("issue")
@click.argument("meter_id", callback=_identity)
@_alg_option
@_rsa_bits_option
@_days_option
@pass_layout
def issue_cmd(layout: PkiLayout, meter_id: str, alg: str, rsa_bits: int | None, days: int) -> None:
    """Issue a meter: TLS key and certificate (CN = METER_ID) plus a signing key pair.

    Prints where the files are and the signing public key to register; refuses an id
    that is already a meter, service or integrator.
    """
    bits = _check_rsa_bits(alg, rsa_bits)
    with _one_line_errors():
        files = issue_device(layout, meter_id, alg=alg, rsa_bits=bits, days=days)
        record = load_identity(files)
        public_pem = files.signing_pub.read_text(encoding="ascii")
    click.echo(f"meter {meter_id}: {files.directory}/")
    click.echo("  tls.crt tls.key (broker login), signing.key signing.pub.pem, identity.json")
    click.echo(
        f"  certificate serial {record.serial}, valid until {record.not_after:%Y-%m-%d}, "
        f"sha256 {record.sha256_fingerprint}"
    )
    click.echo(f"register this {alg} public key:")
    click.echo(public_pem, nl=False)


def _bulk_ids(count: int | None, prefix: str, from_csv: Path | None) -> list[str]:
    if count is not None and from_csv is None:
        return new_meter_ids(count, prefix)
    if from_csv is not None and count is None and not prefix:
        return read_meter_ids(from_csv)
    raise click.UsageError("give either --count (and maybe --prefix) or --from-csv")


@certs.command("issue-bulk")
@click.option("--count", type=click.IntRange(min=1), help="Issue this many new meters.")
@click.option(
    "--prefix",
    default="",
    help=f"With --count: ids are PREFIX + a lowercase UUID4 (at most {MAX_PREFIX} chars).",
)
@click.option(
    "--from-csv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Issue the ids of this CSV's `meter_id` column.",
)
@_alg_option
@_rsa_bits_option
@_days_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Summary CSV to write  [default: PKI_ROOT/devices/bulk-<UTC time>.csv]",
)
@pass_layout
def issue_bulk_cmd(
    layout: PkiLayout,
    *,
    count: int | None,
    prefix: str,
    from_csv: Path | None,
    alg: str,
    rsa_bits: int | None,
    days: int,
    out: Path | None,
) -> None:
    """Issue many meters and write the summary CSV for `meterproof meters register --bulk`.

    Columns: meter_id, alg, public_key_pem (newlines written as \\n), cert_fingerprint
    (SHA-256 of the certificate DER, hex) and serial (hex). All ids are checked before
    the first is issued.
    """
    bits = _check_rsa_bits(alg, rsa_bits)
    path = out or default_csv_path(layout, datetime.now(UTC))
    if path.exists():
        raise click.UsageError(f"{path} exists")
    with _one_line_errors():
        ids = _bulk_ids(count, prefix, from_csv)
    done: list[IssuedDevice] = []
    step = max(1, len(ids) // 10)

    def on_issued(device: IssuedDevice) -> None:
        done.append(device)
        if len(ids) >= 10 and len(done) % step == 0:
            click.echo(f"issued {len(done)}/{len(ids)}", err=True)

    started = time.perf_counter()
    try:
        issue_bulk(layout, ids, alg=alg, rsa_bits=bits, days=days, on_issued=on_issued)
    except (PkiError, ValueError, OSError) as exc:
        if not done:
            raise click.ClickException(str(exc)) from exc
        write_bulk_csv(done, path)
        raise click.ClickException(
            f"{exc}; the {len(done)} of {len(ids)} meters issued before are listed in {path}"
        ) from exc
    elapsed = time.perf_counter() - started
    with _one_line_errors():
        write_bulk_csv(done, path)
    click.echo(f"issued {len(done)} meters ({alg}) in {elapsed:.2f} s; summary: {path}")


@certs.command("issue-integrator")
@click.argument("name", callback=_identity)
@_days_option
@stack_env_option
@pass_layout
def issue_integrator_cmd(layout: PkiLayout, name: str, days: int, stack_env: Path) -> None:
    """Issue a client certificate (CN = NAME) for a reader of verified readings and epochs.

    The name must not be a meter id or a service name: the broker grants roles by CN. A
    running stack's broker gets the new ACL at once. One connection per certificate.
    """
    with _one_line_errors():
        files = issue_integrator(layout, name, days=days)
        record = load_identity(files)
    click.echo(f"integrator {name}: {files.directory}/ (tls.crt tls.key identity.json)")
    click.echo(f"  certificate serial {record.serial}, valid until {record.not_after:%Y-%m-%d}")
    _reload_broker(layout, stack_env)


@certs.command("issue-service")
@click.argument("role", type=click.Choice(SERVICE_NAMES))
@click.option(
    "--instances",
    type=click.IntRange(1, MAX_INGEST_INSTANCES),
    help="ingest only: make sure ingest-0 .. ingest-<N-1> exist  [default: 1]",
)
@_days_option
@stack_env_option
@pass_layout
def issue_service_cmd(
    layout: PkiLayout, role: ServiceName, instances: int | None, days: int, stack_env: Path
) -> None:
    """Issue a service identity: `bridge`, `api`, `admin`, or ingest workers (one each).

    The broker makes a certificate's CN its client id, so a certificate is one connection:
    `meterproof ingest --workers N` needs ingest-0 .. ingest-<N-1>. Existing ingest
    identities are kept; a running stack's broker gets the new ACL at once.
    """
    if instances is not None and role != "ingest":
        raise click.UsageError("--instances applies to ingest only")
    with _one_line_errors():
        if role == "ingest":
            issued = issue_ingest_workers(layout, instances or 1, days=days)
        else:
            issue_service(layout, role, days=days)
            issued = (role,)
    click.echo(f"issued: {', '.join(issued)}" if issued else "issued: none (all exist)")
    for name in issued:
        click.echo(f"  {layout.service(name).directory}/ (tls.crt tls.key identity.json)")
    if issued:
        _reload_broker(layout, stack_env)


def _reload_broker(layout: PkiLayout, stack_env: Path) -> None:
    from meterproof.mosquitto.admin import identities_on_running_broker

    try:
        click.echo(identities_on_running_broker(layout, stack_env))
    except (OSError, ValueError) as exc:
        raise click.ClickException(
            f"issued, but the broker's ACL was not updated ({exc}); "
            "`meterproof stack up` renders it again"
        ) from exc


@certs.command("revoke")
@click.argument("name", callback=_identity)
@stack_env_option
@pass_layout
def revoke_cmd(layout: PkiLayout, name: str, stack_env: Path) -> None:
    """Revoke a meter's or a service's certificate: re-sign the CRL and make the running
    broker refuse it.

    NAME is a meter id or a service identity (a leaked `ingest-0`, `bridge`, `api`); to
    replace a revoked service, move its folder away and run `certs issue-service`.
    Integrators are revoked with `meterproof integrators revoke`, which ends their
    consents too. Revoking twice is harmless; it retries the broker step.
    """
    with _one_line_errors():
        result = crl.revoke_meter_or_service(layout, name)
    state = "was already revoked" if result.already_revoked else "revoked"
    click.echo(
        f"{name}: certificate {result.serial} {state}; CRL {result.crl} "
        f"valid until {result.next_update:%Y-%m-%d}"
    )
    from meterproof.mosquitto.admin import revoke_on_running_broker

    try:
        click.echo(revoke_on_running_broker(name, stack_env))
    except OSError as exc:
        raise click.ClickException(
            f"CRL updated, but the broker did not confirm ({exc}); "
            f"run `meterproof certs revoke {name}` again"
        ) from exc


@certs.command("refresh-crl")
@click.option(
    "--force", is_flag=True, help="Re-sign and reload the broker even when the CRL is fresh."
)
@stack_env_option
@pass_layout
def refresh_crl_cmd(layout: PkiLayout, force: bool, stack_env: Path) -> None:
    """Re-sign the CRL before it expires and make the running broker read the new one.

    The CRL is valid for 30 days; once that has passed, OpenSSL refuses every client,
    meters and services alike ("CRL has expired"). A revocation, `certs init` and
    `stack up` re-sign it, but nothing else does while the stack runs: run this daily
    from cron or a systemd timer, for example

    \b
      17 3 * * *  meterproof certs --pki-root /srv/pki refresh-crl --stack-env /srv/run/stack.env

    It re-signs only a CRL with less than 15 days left, so running it again changes
    nothing, and the broker gets a SIGHUP (Mosquitto 2.0.11 may crash on one later:
    docs/reliability.md) only when the CRL was re-signed. Prints the CRL's nextUpdate.
    --force re-signs and reloads anyway: the retry after the broker did not confirm.
    """
    with _one_line_errors():
        signed = force or not crl.crl_is_fresh(layout)
        until = crl.refresh_crl(layout) if signed else crl.next_update(layout)
    state = "re-signed" if signed else "fresh, left as it is"
    click.echo(f"CRL {layout.crl}: {state}; valid until {until:%Y-%m-%d %H:%M:%S %Z}")
    if not signed:
        return
    from meterproof.mosquitto.admin import crl_on_running_broker

    try:
        click.echo(crl_on_running_broker(stack_env))
    except OSError as exc:
        raise click.ClickException(
            f"CRL re-signed, but the broker did not confirm it read it ({exc}); "
            "run `meterproof certs refresh-crl --force`"
        ) from exc


@certs.command("list")
@pass_layout
def list_cmd(layout: PkiLayout) -> None:
    """Issued identities by role: name, signing algorithm, serial, expiry, status."""
    revoked = {entry.serial for entry in crl.read_revoked(layout)}
    now = datetime.now(UTC)
    for _files, record in list_identities(layout):
        status = (
            "revoked"
            if record.serial in revoked
            else "expired"
            if record.not_after < now
            else "valid"
        )
        click.echo(
            f"{record.role:<10} {record.name:<40} {record.alg or '-':<6} "
            f"{record.serial:<40} {record.not_after:%Y-%m-%d} {status}"
        )
