"""`meterproof meters ...`: the operator's registry commands.

Errors are one line on stderr and never a traceback. Exit codes: 1 for a refused
operation (unknown or already registered meter, decommissioned meter, database
unreachable), 2 for bad input (malformed id, unknown status, bad key, bad CSV row, a
refusal with a reason code such as `set-status M decommissioned`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import click

from meterproof.certs.layout import PkiLayout
from meterproof.cli.errors import Group
from meterproof.cli.options import connect_database, database_option, stack_env_option
from meterproof.config import StackEnv
from meterproof.errors import first_line
from meterproof.registry import pairing, repository, sources, wallets
from meterproof.registry.accounts import AccountId
from meterproof.registry.errors import InvalidInputError, RefusedError, UnknownMeterError
from meterproof.registry.model import (
    KeyRecord,
    MeterRecord,
    MeterStatus,
    NewKey,
    NewMeter,
    SecurityEvent,
    SecurityLevel,
    check_meter_id,
    parse_location,
    quoted,
)
from meterproof.registry.telemetry import record_refusal
from meterproof.schemas.reading import Alg

F = TypeVar("F", bound=Callable[..., Any])


class InputError(click.ClickException):
    """Bad input: one line, exit 2, like click's own usage errors but without the usage."""

    exit_code = 2


class _EnumChoice(click.Choice[str]):
    """A choice whose refusal is one line (click's own prints the usage block too)."""

    def __init__(self, enum: type[StrEnum], *, without: StrEnum | None = None) -> None:
        super().__init__([member.value for member in enum if member is not without])

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> str:
        if isinstance(value, str) and value in self.choices:
            return value
        name = param.name if param is not None and param.name else "value"
        raise InputError(
            f"invalid {name} {quoted(str(value))}: one of {', '.join(map(str, self.choices))}"
        )


def _meter_id(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_meter_id(value)
    except InvalidInputError as exc:
        raise InputError(str(exc)) from None


@click.group(cls=Group)
def meters() -> None:
    """The meter registry: which meters exist, their status and signing keys.

    Readings are accepted only from registered meters whose status is active,
    maintenance or firmware_update, signed by one of their unexpired keys.
    """


@meters.command()
@click.argument("meter_id", required=False, callback=_meter_id)
@click.option(
    "--from-pki",
    is_flag=True,
    help="Take the key, its algorithm and the certificate from the files `certs issue` wrote.",
)
@click.option(
    "--public-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A SubjectPublicKeyInfo PEM file (with --alg), instead of --from-pki.",
)
@click.option("--alg", type=_EnumChoice(Alg), help="The algorithm the key is registered for.")
@click.option("--kid", help="Key id [default: 16 hex digits of SHA-256 of the key's DER].")
@click.option(
    "--bulk",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Register every meter of a CSV (the summary `certs issue-bulk` writes), all or none.",
)
@click.option(
    "--status",
    # Decommissioned is reached only through `decommission`, which revokes the certificate.
    type=_EnumChoice(MeterStatus, without=MeterStatus.DECOMMISSIONED),
    default="active",
    show_default=True,
    help="Starting status (with --bulk, every row's); readings are accepted while it is "
    "active, maintenance or firmware_update.",
)
@click.option(
    "--security-level",
    type=_EnumChoice(SecurityLevel),
    default="standard",
    show_default=True,
    help="Class recorded for the operator (with --bulk, every row's); `meters list` filters "
    "on it, no check depends on it.",
)
@click.option("--owner-wallet", help="The ledger account credited for this meter's export.")
@click.option("--serial", help="Device serial number.")
@click.option("--manufacturer", help="Device manufacturer (recorded only).")
@click.option("--model", help="Device model (recorded only).")
@click.option("--firmware-version", help="Installed firmware version (recorded only).")
@click.option("--hardware-revision", help="Device hardware revision (recorded only).")
@click.option(
    "--location",
    help='Installation site as a JSON object, e.g. \'{"building": "E1", '
    '"gps_coordinates": {"latitude": 13.7, "longitude": 100.5}}\'.',
)
@click.option(
    "--pki-root",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="METERPROOF_PKI_ROOT",
    help="Operator PKI folder [env METERPROOF_PKI_ROOT; default: the stack's, certs/out].",
)
@database_option
def register(
    *,
    meter_id: str | None,
    from_pki: bool,
    public_key: Path | None,
    alg: str | None,
    kid: str | None,
    bulk: Path | None,
    status: str,
    security_level: str,
    owner_wallet: str | None,
    serial: str | None,
    manufacturer: str | None,
    model: str | None,
    firmware_version: str | None,
    hardware_revision: str | None,
    location: str | None,
    pki_root: Path | None,
    database_url: str | None,
) -> None:
    """Register METER_ID with its signing key, or every meter of a --bulk CSV.

    \b
      meterproof meters register M1 --from-pki --owner-wallet W
      meterproof meters register M2 --public-key m2.pub.pem --alg ES256
      meterproof meters register --bulk certs/out/devices/bulk-....csv
    """
    level = SecurityLevel(security_level)
    if bulk is not None:
        per_meter = [meter_id, public_key, alg, kid, owner_wallet, serial, manufacturer, model]
        per_meter += [firmware_version, hardware_revision, location]
        if from_pki or any(value is not None for value in per_meter):
            raise InputError("--bulk takes only --status and --security-level; the rest is per row")
        began = time.perf_counter()
        rows = sources.read_bulk(bulk, status=MeterStatus(status), security_level=level)
        with connect_database(database_url) as conn:
            repository.register(conn, rows)
        elapsed = time.perf_counter() - began
        click.echo(f"registered {len(rows)} meters from {bulk} in {elapsed:.2f} s")
        return
    if meter_id is None:
        raise InputError("give METER_ID, or --bulk CSV")
    cert_fingerprint = cert_serial = None
    if from_pki:
        if public_key is not None or alg is not None:
            raise InputError("--from-pki takes the key from the PKI: drop --public-key/--alg")
        identity = sources.from_pki(PkiLayout(pki_root or StackEnv.load().pki_root), meter_id)
        key = identity.key if kid is None else replace(identity.key, kid=kid)
        cert_fingerprint, cert_serial = identity.cert_fingerprint, identity.cert_serial
    elif public_key is not None and alg is not None:
        key = NewKey.parse(alg, _read_key_file(public_key), kid=kid)
    else:
        raise InputError("give --from-pki, or --public-key FILE with --alg")
    meter = NewMeter(
        meter_id=meter_id,
        key=key,
        status=MeterStatus(status),
        security_level=level,
        owner_wallet=owner_wallet,
        serial=serial,
        manufacturer=manufacturer,
        model=model,
        firmware_version=firmware_version,
        hardware_revision=hardware_revision,
        location=None if location is None else parse_location(location),
        cert_fingerprint=cert_fingerprint,
        cert_serial=cert_serial,
    )
    with connect_database(database_url) as conn:
        repository.register(conn, [meter])
    click.echo(f"registered {meter_id}: {key.alg} key {key.kid}, status {status}")


_WALLET_HELP = (
    "The owner's account, CAIP-10: eip155:<chain id>:<0x address> (EVM, personal_sign)"
    " or solana:<genesis prefix>:<base58 public key> (Ed25519)."
)


@meters.command("link-wallet")
@click.argument("meter_id", callback=_meter_id)
@click.option("--wallet", required=True, help=_WALLET_HELP)
@click.option("--challenge", type=click.UUID, help="Step 2: the challenge id step 1 printed.")
@click.option(
    "--signature",
    type=click.File("r"),
    help="Step 2: a file with the wallet's signature over the document (0x hex for eip155,"
    " base58 for solana).",
)
@click.option(
    "--pairing-code",
    help="Step 1 for a P1 reader: the code `meterproof p1 pair` shows; the reader signs the"
    " document itself, so step 2 then needs no --kid or --meter-signature.",
)
@click.option("--kid", help="Step 2: the meter key that signed the document.")
@click.option(
    "--meter-signature",
    type=click.File("r"),
    help="Step 2: a file with the meter's signature (base64url) over the same document,"
    " e.g. from `meterproof meter sign-document`.",
)
@database_option
def link_wallet_command(
    *,
    meter_id: str,
    wallet: str,
    challenge: UUID | None,
    signature: Any,  # noqa: ANN401 - click's text file
    pairing_code: str | None,
    kid: str | None,
    meter_signature: Any,  # noqa: ANN401 - click's text file
    database_url: str | None,
) -> None:
    """Prove that WALLET owns the meter: future GRID mints go to it, and it may grant consent.

    \b
    Step 1, without --challenge: prints the document (valid 10 minutes) that the wallet
    and the meter must both sign, to stdout; the challenge id is in it.
    Step 2, with --challenge --signature --kid --meter-signature: checks both signatures
    and links. A meter linked before is relinked; the history of links is kept.
    """
    account = AccountId.parse(wallet)
    with connect_database(database_url) as conn:
        if challenge is None:
            issued = (
                wallets.issue_link_challenge(conn, meter_id, account)
                if pairing_code is None
                else pairing.claim(conn, pairing_code, account, meter_id=meter_id)
            )
            signers = "" if pairing_code is None else " (the paired reader signs it itself)"
            click.echo(issued.document, nl=False)
            click.echo(f"sign this with {account}{signers or ' and with the meter key'}, then"
                       f" run again with --challenge {issued.id}", err=True)  # fmt: skip
            return
        if signature is None or (meter_signature is None) != (kid is None):
            raise InputError("step 2 needs --signature, and --kid with --meter-signature"
                             " unless a paired reader signed")  # fmt: skip
        link = wallets.link_wallet(
            conn, meter_id=meter_id, account=account, challenge_id=challenge,
            wallet_signature=signature.read(), meter_kid=kid,
            meter_signature=None if meter_signature is None else meter_signature.read(),
        )  # fmt: skip
    click.echo(f"{link.meter_id}: linked to {link.account} at {link.linked_at:%Y-%m-%d %H:%M:%S%z}")


@meters.command("unlink-wallet")
@click.argument("meter_id", callback=_meter_id)
@click.option("--reason", required=True, help="Why (recorded in the link history).")
@database_option
def unlink_wallet_command(*, meter_id: str, reason: str, database_url: str | None) -> None:
    """End the meter's current wallet link (an operator's act); its GRID then stays
    claimable until a wallet is linked again, and wallet-wide consents stop covering it."""
    with connect_database(database_url) as conn:
        link = wallets.unlink_wallet(conn, meter_id, by="operator", reason=reason)
    click.echo(f"{meter_id}: unlinked from {link.account}")


@meters.command("wallet-history")
@click.argument("meter_id", callback=_meter_id)
@database_option
def wallet_history_command(*, meter_id: str, database_url: str | None) -> None:
    """Every wallet the meter was linked to, newest first."""
    with connect_database(database_url) as conn:
        history = wallets.link_history(conn, meter_id)
    for h in history:
        until = "now" if h.unlinked_at is None else f"{h.unlinked_at:%Y-%m-%d %H:%M:%S}"
        why = "" if h.unlink_reason is None else f" ({h.unlink_reason}, by {h.unlinked_by})"
        click.echo(f"{h.linked_at:%Y-%m-%d %H:%M:%S} .. {until:<19} {h.account}{why}")


@meters.command("list")
@click.option("--status", type=_EnumChoice(MeterStatus), help="Only meters with this status.")
@click.option(
    "--security-level",
    type=_EnumChoice(SecurityLevel),
    help="Only meters with this security level.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="At most this many meters, the first by meter id.",
)
@click.option("--wallet", help="Only meters currently linked to this CAIP-10 account.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
@database_option
def list_command(
    *,
    status: str | None,
    security_level: str | None,
    limit: int,
    wallet: str | None,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Registered meters, by meter id."""
    with connect_database(database_url) as conn:
        if wallet is None:
            found = repository.list_meters(
                conn,
                status=None if status is None else MeterStatus(status),
                security_level=None if security_level is None else SecurityLevel(security_level),
                limit=limit,
            )
        else:  # a wallet holds a household's meters, not a fleet: filtered here
            linked = wallets.meters_of_wallet(conn, AccountId.parse(wallet))
            found = [
                m
                for m in map(partial(repository.fetch_meter, conn), linked)
                if m and status in (None, m.status) and security_level in (None, m.security_level)
            ][:limit]
    if as_json:
        click.echo(json.dumps([_json(m) for m in found], indent=2))
        return
    for m in found:
        click.echo(
            f"{m.meter_id:<40} {m.status:<16} {m.security_level:<12} {m.owner_wallet or '-'}"
        )


@meters.command()
@click.argument("meter_id", callback=_meter_id)
@click.option(
    "--events",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="How many of the latest security events to show (0: none).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
@database_option
def show(meter_id: str, events: int, as_json: bool, database_url: str | None) -> None:
    """A meter, all its keys (expired ones too) and its latest security events."""
    with connect_database(database_url) as conn:
        meter = _require(repository.fetch_meter(conn, meter_id), meter_id)
        keys = repository.all_keys(conn, meter_id)
        recent = repository.recent_events(conn, meter_id, limit=events) if events else []
    if as_json:
        document = {
            **_json(meter),
            "keys": [_json(k) for k in keys],
            "events": [_json(e) for e in recent],
        }
        click.echo(json.dumps(document, indent=2))
        return
    for name, value in _json(meter).items():
        shown = json.dumps(value) if isinstance(value, dict) else value
        click.echo(f"{name + ':':<19} {'-' if value is None else shown}")
    for k in keys:
        until = "no end" if k.valid_to is None else f"until {k.valid_to:%Y-%m-%d %H:%M:%S%z}"
        click.echo(f"key {k.kid:<20} {k.alg:<6} from {k.valid_from:%Y-%m-%d %H:%M:%S%z} {until}")
    for e in recent:
        click.echo(
            f"event {e.at:%Y-%m-%d %H:%M:%S%z} {e.severity:<9} {e.type} {json.dumps(e.detail)}"
        )


@meters.command("set-status")
@click.argument("meter_id", callback=_meter_id)
@click.argument("status", type=_EnumChoice(MeterStatus))
@click.option("--reason", help="Why, for the security event log.")
@database_option
def set_status(meter_id: str, status: str, reason: str | None, database_url: str | None) -> None:
    """Set METER_ID's STATUS; workers honour it within a second.

    Readings are accepted while the status is active, maintenance or firmware_update.
    STATUS decommissioned is refused: `decommission` sets it (final) and also revokes the
    certificate, which would otherwise still open a broker connection.
    """
    with connect_database(database_url) as conn:
        if status == MeterStatus.DECOMMISSIONED:
            refusal = RefusedError(
                "decommission_without_revocation",
                f"set-status leaves the certificate valid; run `meterproof meters decommission"
                f" {meter_id}`, which revokes it",
            )
            record_refusal(conn, "set_status", refusal, meter_id=meter_id, account=None)
            raise refusal
        change = repository.set_status(conn, meter_id, MeterStatus(status), reason=reason)
    _echo_change(change.meter_id, change.old, change.new)


@meters.command()
@click.argument("meter_id", callback=_meter_id)
@click.option("--reason", help="Why, for the security event log.")
@database_option
def quarantine(meter_id: str, reason: str | None, database_url: str | None) -> None:
    """Stop accepting METER_ID's readings at once and log a critical security event."""
    with connect_database(database_url) as conn:
        change = repository.set_status(
            conn, meter_id, MeterStatus.QUARANTINED, reason=reason, event_type="quarantined"
        )
    _echo_change(change.meter_id, change.old, change.new)


@meters.command("rotate-key")
@click.argument("meter_id", callback=_meter_id)
@click.option(
    "--public-key",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The new key, a SubjectPublicKeyInfo PEM file.",
)
@click.option(
    "--alg",
    type=_EnumChoice(Alg),
    required=True,
    help="The algorithm the new key is registered for; the key must be of its type.",
)
@click.option("--kid", help="Key id [default: 16 hex digits of SHA-256 of the key's DER].")
@click.option(
    "--overlap-hours",
    type=click.FloatRange(min=0, max=repository.MAX_OVERLAP.days * 24),
    default=24,
    show_default=True,
    help="How long the current keys stay valid: readings signed before the meter "
    "switched, or still queued, keep verifying meanwhile.",
)
@database_option
def rotate_key(
    *,
    meter_id: str,
    public_key: Path,
    alg: str,
    kid: str | None,
    overlap_hours: float,
    database_url: str | None,
) -> None:
    """Add a new signing key to METER_ID; the current keys expire after the overlap."""
    key = NewKey.parse(alg, _read_key_file(public_key), kid=kid)
    with connect_database(database_url) as conn:
        rotation = repository.rotate_key(
            conn, meter_id, key, overlap=timedelta(hours=overlap_hours)
        )
    retiring = ", ".join(rotation.retiring) or "none"
    click.echo(
        f"{meter_id}: added {key.alg} key {key.kid}; retiring {retiring} in {overlap_hours:g} h"
    )


@meters.command()
@click.argument("meter_id", callback=_meter_id)
@click.option("--reason", help="Why, for the security event log.")
@click.option(
    "--pki-root",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="METERPROOF_PKI_ROOT",
    help="Operator PKI folder [env METERPROOF_PKI_ROOT; default: the stack's, certs/out].",
)
@stack_env_option
@database_option
def decommission(
    *,
    meter_id: str,
    reason: str | None,
    pki_root: Path | None,
    stack_env: Path,
    database_url: str | None,
) -> None:
    """Retire METER_ID for good and revoke its certificate.

    The status becomes decommissioned (final), the certificate is revoked in the PKI, and
    a running broker drops the meter's connection. Re-running retries the later steps.
    """
    with connect_database(database_url) as conn:
        change = repository.set_status(conn, meter_id, MeterStatus.DECOMMISSIONED, reason=reason)
    _echo_change(change.meter_id, change.old, change.new)
    _revoke_certificate(meter_id, pki_root, stack_env)


def _revoke_certificate(meter_id: str, pki_root: Path | None, stack_env: Path) -> None:
    from meterproof.certs.crl import revoke
    from meterproof.certs.errors import PkiError, UnknownIdentityError

    layout = PkiLayout(pki_root or StackEnv.load().pki_root)
    try:
        result = revoke(layout, meter_id)
    except UnknownIdentityError:
        click.echo(f"no certificate for {meter_id} in {layout.root}: nothing to revoke")
        return
    except (PkiError, OSError) as exc:
        raise click.ClickException(
            f"decommissioned, but revoking the certificate failed ({first_line(exc)}); "
            f"run `meterproof meters decommission {meter_id}` again"
        ) from None
    state = "was already revoked" if result.already_revoked else "revoked"
    click.echo(f"certificate {result.serial} {state}; CRL re-signed")
    from meterproof.mosquitto.admin import revoke_on_running_broker

    try:
        click.echo(revoke_on_running_broker(meter_id, stack_env))
    except OSError as exc:
        raise click.ClickException(
            f"certificate revoked, but the broker did not confirm ({first_line(exc)}); "
            f"run `meterproof meters decommission {meter_id}` again"
        ) from None


def _read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(64 * 1024)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None


def _require(meter: MeterRecord | None, meter_id: str) -> MeterRecord:
    if meter is None:
        raise UnknownMeterError(f"no meter {quoted(meter_id)} is registered")
    return meter


def _echo_change(meter_id: str, old: MeterStatus, new: MeterStatus) -> None:
    if old is new:
        click.echo(f"{meter_id}: already {new}")
    else:
        click.echo(f"{meter_id}: {old} -> {new}")


def _json(record: MeterRecord | KeyRecord | SecurityEvent) -> dict[str, Any]:
    return {name: _plain(value) for name, value in asdict(record).items()}


def _plain(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    return value
