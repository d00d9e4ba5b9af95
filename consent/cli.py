"""`meterproof integrators` and `meterproof consent`: who may read which meter's data."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import click
import psycopg

from meterproof.certs import crl
from meterproof.certs.identities import issue_integrator, load_identity
from meterproof.certs.layout import PkiLayout, check_identity
from meterproof.cli.errors import Group
from meterproof.cli.options import (
    connect_database,
    database_option,
    pki_root_option,
    stack_env_option,
)
from meterproof.consent import repository
from meterproof.consent.model import Scope
from meterproof.errors import InputError
from meterproof.registry import documents, wallets
from meterproof.registry.accounts import AccountId
from meterproof.registry.model import check_label, check_meter_id


def _name(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    return None if value is None else check_identity(value)


@click.group(cls=Group)
def integrators() -> None:
    """Third parties that read verified readings, only as far as owners consented.

    Each has a TLS client certificate (CN = its name) for the broker, where it reads
    integrators/<name>/verified/# and ledger/#, and an API client secret.
    """


@integrators.command("add")
@click.argument("name", callback=_name)
@click.option(
    "--days",
    type=click.IntRange(1, 3650),
    default=365,
    show_default=True,
    help="Validity of a new certificate in days (one issued before is reused as it is).",
)
@pki_root_option
@stack_env_option
@database_option
def add_command(
    *, name: str, days: int, pki_root: Path, stack_env: Path, database_url: str | None
) -> None:
    """Issue NAME's certificate, record it, and print its API client secret (once).

    A certificate issued before (by an earlier attempt or `certs issue-integrator`) is
    reused. A running broker gets the new ACL at once.
    """
    from meterproof.mosquitto.admin import identities_on_running_broker

    layout = PkiLayout(pki_root)
    files = layout.integrator(name)
    if not files.meta.exists():
        issue_integrator(layout, name, days=days)
    record = load_identity(files)
    with connect_database(database_url) as conn:
        secret = repository.add_integrator(conn, name, cert_serial=record.serial)
    click.echo(f"integrator {name}: certificate {files.directory}/ (serial {record.serial})")
    click.echo(f"  API client id {name}, client secret (shown once): {secret}")
    click.echo(f"  {identities_on_running_broker(layout, stack_env)}")


@integrators.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
@database_option
def list_integrators_command(*, as_json: bool, database_url: str | None) -> None:
    """Every integrator, active or revoked."""
    with connect_database(database_url) as conn:
        found = repository.list_integrators(conn)
    if as_json:
        click.echo(json.dumps([asdict(i) for i in found], default=str, indent=2))
        return
    for i in found:
        click.echo(f"{i.name:<32} {i.status:<8} serial {i.cert_serial}  since {i.created_at:%F}")


@integrators.command("show")
@click.argument("name", callback=_name)
@database_option
def show_integrator_command(*, name: str, database_url: str | None) -> None:
    """One integrator and its consents."""
    with connect_database(database_url) as conn:
        found = repository.fetch_integrator(conn, name)
        if found is None:
            raise InputError(f"no integrator {name!r}")
        consents = repository.list_consents(conn, integrator=name)
    click.echo(f"{found.name}: {found.status}, certificate serial {found.cert_serial}")
    if found.revoked_at is not None:
        click.echo(f"  revoked {found.revoked_at:%F %T%z}: {found.revoked_reason}")
    click.echo(f"  consents: {len(consents)}")
    for c in consents:
        click.echo(f"    {_consent_line(c)}")


@integrators.command("revoke")
@click.argument("name", callback=_name)
@click.option("--reason", required=True, help="Why (recorded).")
@pki_root_option
@stack_env_option
@database_option
def revoke_integrator_command(
    *, name: str, reason: str, pki_root: Path, stack_env: Path, database_url: str | None
) -> None:
    """Stop NAME's access everywhere: its consents stop counting at once, its certificate
    is revoked and its open broker connection is cut. Running it again is harmless."""
    from meterproof.mosquitto.admin import revoke_on_running_broker

    layout = PkiLayout(pki_root)
    with connect_database(database_url) as conn:
        found = repository.revoke_integrator(conn, name, reason=check_label(reason, "reason"))
    click.echo(f"integrator {name}: {found.status} (consents no longer count)")
    files = layout.integrator(name)
    if files.meta.exists():
        result = crl.revoke_identity(layout, files, name)
        click.echo(
            f"  certificate {result.serial} in the CRL (next update {result.next_update:%F})"
        )
        click.echo(f"  {revoke_on_running_broker(name, stack_env)}")
    else:
        click.echo(f"  no certificate of {name} under {layout.root}: revoke it where it lives")


@click.group(cls=Group)
def consent() -> None:
    """Owners' consents: which integrator sees which meter's data, for what and when.

    \b
    Scopes: live (the verified stream), history (stored readings),
            ledger (anchored entries, proofs and mints of those meters).
    An owner grants by signing the document `consent request` prints with the wallet
    linked to the meter (`meters link-wallet`); an operator may grant or revoke with a
    recorded reason. Times are ISO 8601 (UTC if no offset).
    """


def _when(_ctx: click.Context, _param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 time: {value!r}") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _scopes(_ctx: click.Context, _param: click.Parameter, value: str) -> frozenset[Scope]:
    try:
        return frozenset(Scope(s.strip()) for s in value.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"scopes are {', '.join(Scope)}, comma-separated") from None


def _grant_options(command: Any) -> Any:  # noqa: ANN401 - a click decorator stack
    for option in reversed(
        [
            click.option(
                "--integrator", required=True, callback=_name, help="The integrator given access."
            ),
            click.option("--meter", "meter_id", help="One meter."),
            click.option("--wallet", help="Every meter currently linked to this account."),
            click.option(
                "--scope",
                "scopes",
                default="live,history,ledger",
                show_default=True,
                callback=_scopes,
                help="Comma-separated: live, history, ledger.",
            ),
            click.option(
                "--from",
                "data_from",
                callback=_when,
                help="Data from this reading time [default: now].",
            ),
            click.option(
                "--to",
                "data_to",
                callback=_when,
                help="Data until this reading time, exclusive [default: open].",
            ),
            click.option("--expires", callback=_when, help="The consent ends [default: never]."),
        ]
    ):
        command = option(command)
    return command


def _request(
    *,
    integrator: str,
    meter_id: str | None,
    wallet: str | None,
    scopes: frozenset[Scope],
    data_from: datetime | None,
    data_to: datetime | None,
    expires: datetime | None,
) -> repository.GrantRequest:
    if (meter_id is None) == (wallet is None):
        raise InputError("name exactly one of --meter and --wallet")
    if not scopes:
        raise InputError("--scope names no scope")
    return repository.GrantRequest(
        integrator=integrator,
        meter_id=None if meter_id is None else check_meter_id(meter_id),
        account=None if wallet is None else AccountId.parse(wallet),
        scopes=scopes,
        data_from=data_from or datetime.now(UTC).replace(microsecond=0),
        data_to=data_to,
        expires_at=expires,
    )


@consent.command("request")
@_grant_options
@click.option("--signer", required=True, help="The owner's account (CAIP-10) that will sign.")
@database_option
def request_command(
    *,
    signer: str,
    database_url: str | None,
    **grant: Any,  # noqa: ANN401 - click's values
) -> None:
    """Print the document the owner's wallet signs for this grant (valid 10 minutes).

    Run `consent grant` with the same options plus --challenge and --signature after.
    """
    account = AccountId.parse(signer)
    with connect_database(database_url) as conn:
        issued = repository.request_grant(conn, _request(**grant), account)
    click.echo(issued.document, nl=False)
    click.echo(f"sign with {account}, then: consent grant ... --signer {account}"
               f" --challenge {issued.id} --signature FILE", err=True)  # fmt: skip


@consent.command("grant")
@_grant_options
@click.option("--signer", help="The owner's account that signed.")
@click.option("--challenge", type=click.UUID, help="The challenge `consent request` issued.")
@click.option("--signature", type=click.File("r"), help="A file with the owner's signature.")
@click.option("--operator-reason", help="Grant as the operator, with this recorded reason.")
@database_option
def grant_command(
    *,
    signer: str | None,
    challenge: UUID | None,
    signature: Any,  # noqa: ANN401 - click's text file
    operator_reason: str | None,
    database_url: str | None,
    **grant: Any,  # noqa: ANN401 - click's option values
) -> None:
    """Grant an integrator access, as the owner (--signer --challenge --signature) or as
    the operator (--operator-reason)."""
    owner = (signer, challenge, signature)
    if (operator_reason is None) == all(v is None for v in owner):
        raise InputError("give either --signer, --challenge and --signature, or --operator-reason")
    if operator_reason is None and any(v is None for v in owner):
        raise InputError("an owner's grant needs --signer, --challenge and --signature")
    with connect_database(database_url) as conn:
        if challenge is not None and grant["data_from"] is None:
            grant["data_from"] = _signed_from(conn, challenge)
        made = repository.grant(
            conn,
            _request(**grant),
            signer=None if signer is None else AccountId.parse(signer),
            challenge_id=challenge,
            signature=None if signature is None else signature.read(),
            operator_reason=None if operator_reason is None else check_label(
                operator_reason, "operator reason"),
        )  # fmt: skip
    click.echo(f"granted {made.id}: {_consent_line(made)}")


@consent.command("revoke")
@click.argument("consent_id", type=click.UUID)
@click.option("--operator-reason", help="Revoke as the operator, with this recorded reason.")
@click.option("--signer", help="The owner's account revoking it.")
@click.option("--challenge", type=click.UUID, help="From `consent revoke ID --signer A` first.")
@click.option("--signature", type=click.File("r"), help="A file with the owner's signature.")
@database_option
def revoke_command(
    *,
    consent_id: UUID,
    operator_reason: str | None,
    signer: str | None,
    challenge: UUID | None,
    signature: Any,  # noqa: ANN401 - click's text file
    database_url: str | None,
) -> None:
    """End a consent now. As the owner: run with --signer first to get the document to
    sign, then again with --signer --challenge --signature. Or --operator-reason."""
    with connect_database(database_url) as conn:
        if operator_reason is not None:
            ended = repository.revoke(
                conn, consent_id, operator_reason=check_label(operator_reason, "operator reason")
            )
        elif signer is not None and challenge is None:
            issued = repository.request_revoke(conn, consent_id, AccountId.parse(signer))
            click.echo(issued.document, nl=False)
            click.echo(f"sign, then run again with --challenge {issued.id} --signature FILE",
                       err=True)  # fmt: skip
            return
        elif signer is not None and signature is not None:
            ended = repository.revoke(
                conn, consent_id, signer=AccountId.parse(signer), challenge_id=challenge,
                signature=signature.read(),
            )  # fmt: skip
        else:
            raise InputError("give --operator-reason, or --signer (then --challenge, --signature)")
    click.echo(f"revoked {ended.id}: {_consent_line(ended)}")


@consent.command("list")
@click.option("--integrator", callback=_name, help="Only this integrator's consents.")
@click.option(
    "--meter",
    "meter_id",
    help="Only consents covering this meter, directly or through its current wallet.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
@database_option
def list_command(
    *, integrator: str | None, meter_id: str | None, as_json: bool, database_url: str | None
) -> None:
    """Consents, newest first (a meter's include its current wallet's)."""
    with connect_database(database_url) as conn:
        repository.record_expiries(conn)
        found = repository.list_consents(
            conn, integrator=integrator, meter_id=meter_id and check_meter_id(meter_id)
        )
    if as_json:
        click.echo(json.dumps([asdict(c) for c in found], default=str, indent=2))
        return
    for c in found:
        click.echo(f"{c.id} {_consent_line(c)}")


@consent.command("show")
@click.argument("consent_id", type=click.UUID)
@database_option
def show_command(*, consent_id: UUID, database_url: str | None) -> None:
    """One consent and its audit trail."""
    with connect_database(database_url) as conn:
        repository.record_expiries(conn)
        found = repository.show(conn, consent_id)
    if found is None:
        raise InputError(f"no consent {consent_id}")
    click.echo(f"{found.id}: {_consent_line(found)}")
    click.echo(f"  granted by {found.granted_by} at {found.granted_at:%F %T%z}")
    for e in found.events:
        click.echo(f"  {e['at']:%F %T%z} {e['event']:<8} by {e['actor']}: {e['reason']}"
                   f"{'' if not e['detail'] else ' ' + json.dumps(e['detail'])}")  # fmt: skip


def _signed_from(conn: psycopg.Connection[Any], challenge: UUID) -> datetime | None:
    """The `from` of the document an owner signed: `consent request` defaulted it to its
    own time, which a later `grant` without --from must not move."""
    document = wallets.challenge_document(conn, challenge)
    if document is None:
        return None
    signed = documents.parse(document)[1].get("from", "-")
    return None if signed == "-" else datetime.fromisoformat(signed)


def _consent_line(c: repository.Consent) -> str:
    target = f"meter {c.meter_id}" if c.meter_id else f"every meter of {c.account}"
    until = "open" if c.data_to is None else f"{c.data_to:%F %T}"
    expires = "never" if c.expires_at is None else f"{c.expires_at:%F %T}"
    return (
        f"{c.status:<7} {c.integrator} -> {target} [{','.join(c.scopes)}]"
        f" data {c.data_from:%F %T} .. {until}, expires {expires}"
    )
