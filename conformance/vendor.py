"""A meter identity the vendor brings: its own device certificate from its own CA.

A vendor's meters leave the factory with certificates of the vendor's CA, so the kit must
accept that identity rather than only issue one. Before a run the certificate is checked
the way the broker will check it, so a wrong one is refused with a named reason before
anything starts, and never found out later as a meter that "cannot connect":

- `vendor_ca_unreadable`, `vendor_cert_unreadable`: not PEM certificates;
- `vendor_ca_not_ca`: a certificate in the CA file that is not a CA (basicConstraints);
- `vendor_cert_untrusted`: not signed by any certificate of the CA file;
- `vendor_cert_expired`, `vendor_cert_not_yet_valid`: outside its validity now;
- `vendor_cert_bad_cn`: no CN, or one that is not a meter id (it becomes the MQTT
  username, the meter_id and the topic level, as for the meters we issue);
- `vendor_cert_cn_mismatch`: --meter-id names another meter;
- `vendor_cert_not_client`: an extended key usage without TLS client authentication;
- `vendor_key_mismatch`: the private key given is not the certificate's.

For the run, the private broker trusts the union of our CA and the vendor's (Mosquitto's
`cafile` may hold several). Each refusal is a log line and a metric, like every refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import Counter

from meterproof.certs.layout import check_identity
from meterproof.errors import InputError

log = structlog.get_logger("conformance.vendor")

REFUSALS: Final = Counter(
    "meterproof_conformance_identity_refusals",
    "Vendor-brought meter identities the conformance kit refused, by reason",
    ["reason"],
)


class IdentityRefusedError(InputError):
    """A vendor identity the kit will not run with; `code` is the stable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass(frozen=True, slots=True)
class VendorIdentity:
    """The files a vendor gives: its device certificate, its CA (one or more PEM
    certificates) and, when the kit must hand the meter command its TLS key, that key."""

    cert: Path
    ca: Path
    key: Path | None = None


def _certificates(path: Path, code: str) -> list[x509.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise IdentityRefusedError(code, f"{path}: {exc}") from None
    return found


def _check(vendor: VendorIdentity, meter_id: str | None, now: datetime) -> str:
    cas = _certificates(vendor.ca, "vendor_ca_unreadable")
    leaf = _certificates(vendor.cert, "vendor_cert_unreadable")[0]
    for ca in cas:
        try:
            is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise IdentityRefusedError(
                "vendor_ca_not_ca", f"{ca.subject.rfc4514_string()} in {vendor.ca} is no CA"
            )
    if not any(_issued_by(leaf, ca) for ca in cas):
        raise IdentityRefusedError(
            "vendor_cert_untrusted",
            f"{leaf.subject.rfc4514_string()} (issuer {leaf.issuer.rfc4514_string()}) is not "
            f"signed by a certificate of {vendor.ca}",
        )
    if now > leaf.not_valid_after_utc:
        raise IdentityRefusedError("vendor_cert_expired", f"expired {leaf.not_valid_after_utc}")
    if now < leaf.not_valid_before_utc:
        raise IdentityRefusedError(
            "vendor_cert_not_yet_valid", f"valid from {leaf.not_valid_before_utc}"
        )
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        cn = check_identity(str(names[0].value)) if names else None
    except ValueError as exc:
        raise IdentityRefusedError("vendor_cert_bad_cn", str(exc)) from None
    if cn is None:
        raise IdentityRefusedError("vendor_cert_bad_cn", "the certificate has no CN")
    if meter_id is not None and cn != meter_id:
        raise IdentityRefusedError(
            "vendor_cert_cn_mismatch", f"the certificate is {cn!r}, --meter-id {meter_id!r}"
        )
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise IdentityRefusedError(
                "vendor_cert_not_client", "its extended key usage lacks TLS client auth"
            )
    except x509.ExtensionNotFound:
        pass  # no restriction: any use, client authentication included
    if vendor.key is not None:
        _check_key(vendor.key, leaf)
    return cn


def _issued_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_key(path: Path, leaf: x509.Certificate) -> None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise IdentityRefusedError("vendor_key_mismatch", f"{path}: unreadable: {exc}") from None
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise IdentityRefusedError("vendor_key_mismatch", f"{path} is not the certificate's key")


def accept(vendor: VendorIdentity, meter_id: str | None, *, now: datetime | None = None) -> str:
    """The meter id (the certificate's CN) of an acceptable vendor identity; a refusal is
    raised, logged and counted otherwise."""
    try:
        return _check(vendor, meter_id, now or datetime.now(UTC))
    except IdentityRefusedError as refusal:
        REFUSALS.labels(reason=refusal.code).inc()
        log.warning("conformance.identity_refused", reason=refusal.code, detail=str(refusal),
                    cert=str(vendor.cert), ca=str(vendor.ca))  # fmt: skip
        raise


def trust_bundle(ours: Path, vendor: VendorIdentity, into: Path) -> Path:
    """One PEM file with our CA and the vendor's, for the broker's `cafile`."""
    into.write_bytes(ours.read_bytes().rstrip(b"\n") + b"\n" + vendor.ca.read_bytes())
    return into
