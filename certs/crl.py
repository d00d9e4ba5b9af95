"""Revocation: `ca/revoked.json` is the source of truth, `ca/crl.pem` is rebuilt from it.

The CRL is signed by the issuing CA, the issuer of every leaf, so one CRL covers them all
(Mosquitto checks the client's own certificate only). It must be re-signed before its
`nextUpdate`, or OpenSSL refuses every client with "CRL has expired": each revocation
re-signs it, and `certs init` and `certs refresh-crl` (daily, from cron or a timer)
re-sign one that is past half its life. Nothing here talks to the broker; `certs revoke`
and `certs refresh-crl` do that after the CRL is on disk.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from meterproof.certs.authority import CLOCK_SKEW, Authority
from meterproof.certs.errors import PkiError, UnknownIdentityError
from meterproof.certs.identities import load_identity
from meterproof.certs.keys import locked, replace_file
from meterproof.certs.layout import IdentityFiles, PkiLayout

CRL_VALIDITY: Final = timedelta(days=30)


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    serial: str
    name: str
    revoked_at: datetime


@dataclass(frozen=True, slots=True)
class RevokeResult:
    name: str
    serial: str
    already_revoked: bool
    crl: Path
    next_update: datetime


def _locked(layout: PkiLayout) -> AbstractContextManager[None]:
    """Two revocations at once must not both rewrite the index from the same old copy."""
    return locked(layout.ca_dir / ".lock")


def read_revoked(layout: PkiLayout) -> list[RevokedEntry]:
    if not layout.revoked_index.exists():
        return []
    return [
        RevokedEntry(item["serial"], item["name"], datetime.fromisoformat(item["revoked_at"]))
        for item in json.loads(layout.revoked_index.read_bytes())
    ]


def _write_index(layout: PkiLayout, entries: list[RevokedEntry]) -> None:
    data = [
        {"serial": e.serial, "name": e.name, "revoked_at": e.revoked_at.isoformat()}
        for e in entries
    ]
    replace_file(layout.revoked_index, json.dumps(data, indent=2).encode() + b"\n")


def _next_crl_number(layout: PkiLayout) -> int:
    """CRL numbers must increase (RFC 5280 5.2.3); the current CRL holds the last one."""
    if not layout.crl.exists():
        return 1
    current = x509.load_pem_x509_crl(layout.crl.read_bytes())
    return current.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1


def _write_crl(layout: PkiLayout, authority: Authority, entries: list[RevokedEntry]) -> datetime:
    """`thisUpdate` is back-dated like a certificate's start: OpenSSL refuses every client
    ("CRL is not yet valid") on a broker whose clock is behind the signer's."""
    now = datetime.now(UTC)
    next_update = now + CRL_VALIDITY
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(authority.cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(_next_crl_number(layout)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
            critical=False,
        )
    )
    for entry in entries:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry.serial, 16))
            .revocation_date(entry.revoked_at)
            .build()
        )
    crl = builder.sign(authority.key, hashes.SHA256())
    replace_file(layout.crl, crl.public_bytes(serialization.Encoding.PEM))
    return next_update


def next_update(layout: PkiLayout) -> datetime | None:
    """The CRL's `nextUpdate`, after which OpenSSL refuses every client; None without a CRL."""
    if not layout.crl.exists():
        return None
    return x509.load_pem_x509_crl(layout.crl.read_bytes()).next_update_utc


def crl_is_fresh(layout: PkiLayout) -> bool:
    """Present and less than half of its validity used."""
    until = next_update(layout)
    return until is not None and until - datetime.now(UTC) > CRL_VALIDITY / 2


def refresh_crl(layout: PkiLayout) -> datetime:
    """Re-sign the CRL from the index; returns its new `nextUpdate`."""
    authority = Authority.load(layout)
    with _locked(layout):
        return _write_crl(layout, authority, read_revoked(layout))


def revoke(layout: PkiLayout, meter_id: str) -> RevokeResult:
    """Add the meter's certificate to the index and re-sign the CRL (no broker I/O).

    Revoking twice is not an error: the result says `already_revoked`, and the CRL is
    re-signed anyway, so a retry after a failed broker update starts from a fresh CRL.
    """
    files = layout.device(meter_id)
    if not files.meta.exists():
        raise UnknownIdentityError(f"no meter {meter_id!r} in {layout.root}")
    return revoke_identity(layout, files, meter_id)


def revoke_meter_or_service(layout: PkiLayout, name: str) -> RevokeResult:
    """`certs revoke`: a meter, or a service whose certificate leaked (it carries that
    service's rights until revoked). An integrator is refused: `integrators revoke` also
    ends its consents, which a revoked certificate alone would leave counting in the API.
    """
    for files in (layout.device(name), layout.service(name)):
        if files.meta.exists():
            return revoke_identity(layout, files, name)
    if layout.integrator(name).meta.exists():
        raise PkiError(
            f"{name!r} is an integrator: `meterproof integrators revoke {name}` revokes its"
            " certificate and ends its consents"
        )
    raise UnknownIdentityError(f"no meter or service {name!r} in {layout.root}")


def revoke_identity(layout: PkiLayout, files: IdentityFiles, name: str) -> RevokeResult:
    """`revoke` for any identity the CA issued (a meter, a service, an integrator)."""
    serial = load_identity(files).serial
    authority = Authority.load(layout)
    with _locked(layout):
        entries = read_revoked(layout)
        already = any(entry.serial == serial for entry in entries)
        if not already:
            entries.append(RevokedEntry(serial, name, datetime.now(UTC)))
            _write_index(layout, entries)
        next_update = _write_crl(layout, authority, entries)
    return RevokeResult(name, serial, already, layout.crl, next_update)
