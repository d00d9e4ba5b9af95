"""The two-level CA: a root that signs rarely and an EC P-256 issuing CA that signs the rest.

Why two levels: the default root key is RSA-4096, which signs only ~540 certificates/s here,
while P-256 signs ~38,000/s, so a fleet of 1,000 meters is issued in a fraction of a
second. The root signs only the issuing CA; the issuing CA signs every leaf (broker,
services, meters, integrators) and the CRL, so one CRL covers every certificate a client
can present.

Every leaf certificate file holds the leaf followed by the issuing CA: peers send the
intermediate themselves and trust the root alone. The broker therefore needs exactly
`cafile = ca/ca.crt`, `certfile = server/server.crt`, `keyfile = server/server.key` and
`crlfile = ca/crl.pem`; clients need `ca/ca.crt` plus their own `tls.crt`/`tls.key`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meterproof.certs.errors import MissingCaError
from meterproof.certs.keys import private_pem, publish_directory
from meterproof.certs.layout import PkiLayout

CaKeyType = Literal["rsa4096", "ec-p384"]
CA_KEY_TYPES: Final[tuple[CaKeyType, ...]] = ("rsa4096", "ec-p384")
LeafUsage = Literal["client", "server"]

#: Certificates start this far in the past so a meter whose clock runs a little behind
#: still accepts its fresh certificate.
CLOCK_SKEW: Final = timedelta(minutes=5)
ORGANIZATION: Final = "meterproof"
MISSING_CA: Final = "no CA: run `meterproof certs init` first"


@dataclass(frozen=True, slots=True)
class Validity:
    not_before: datetime
    not_after: datetime

    @classmethod
    def of(
        cls,
        days: int,
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Validity:
        """`days` from now, unless explicit bounds are given (tests issue expired certs)."""
        if days < 1:
            raise ValueError(f"days must be at least 1, not {days}")
        start = not_before or datetime.now(UTC) - CLOCK_SKEW
        end = not_after or start + CLOCK_SKEW + timedelta(days=days)
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("not_before and not_after must be timezone-aware")
        if end <= start:
            raise ValueError(f"not_after {end.isoformat()} is not after {start.isoformat()}")
        return cls(start, end)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_certificate(
    subject: x509.Name,
    public_key: CertificatePublicKeyTypes,
    *,
    issuer: x509.Name,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    path_length: int,
    validity: Validity,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, _hash_for(issuer_key))
    )


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | hashes.SHA384:
    """A P-384 root signs with SHA-384 so the hash is no weaker than the curve."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1):
        return hashes.SHA384()
    return hashes.SHA256()


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def create_ca(layout: PkiLayout, *, key_type: CaKeyType, days: int) -> None:
    """Publish the root and the issuing CA together; FileExistsError if `ca/` exists."""
    validity = Validity.of(days)
    root_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=4096)
        if key_type == "rsa4096"
        else ec.generate_private_key(ec.SECP384R1())
    )
    root_name = _name("meterproof root CA")
    root = _ca_certificate(
        root_name,
        root_key.public_key(),
        issuer=root_name,
        issuer_key=root_key,
        path_length=1,
        validity=validity,
    )
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    issuing = _ca_certificate(
        _name("meterproof issuing CA"),
        issuing_key.public_key(),
        issuer=root_name,
        issuer_key=root_key,
        path_length=0,
        validity=validity,
    )
    publish_directory(
        layout.ca_dir,
        layout.staging_dir,
        public={
            layout.ca_cert.name: root.public_bytes(serialization.Encoding.PEM),
            layout.issuing_cert.name: issuing.public_bytes(serialization.Encoding.PEM),
        },
        private={
            layout.ca_key.name: private_pem(root_key),
            layout.issuing_key.name: private_pem(issuing_key),
        },
    )


def describe_root(layout: PkiLayout) -> str:
    """The existing root's key, for the report of an `init` that left it alone."""
    key = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes()).public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__


def subject_alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """An IP literal becomes an IP SAN (clients connecting to 127.0.0.1 check that)."""
    result: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex: what `openssl x509 -fingerprint` shows."""
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True, slots=True)
class Authority:
    """The issuing CA, loaded once and used for many leaves (bulk issuance, CRLs)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, layout: PkiLayout) -> Authority:
        if not layout.issuing_cert.exists() or not layout.issuing_key.exists():
            raise MissingCaError(MISSING_CA)
        cert = x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes())
        key = serialization.load_pem_private_key(layout.issuing_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError(f"{layout.issuing_key} is not an EC key")
        return cls(cert, key)

    def issue(
        self,
        common_name: str,
        public_key: CertificatePublicKeyTypes,
        *,
        usage: LeafUsage,
        validity: Validity,
        alt_names: Sequence[x509.GeneralName] = (),
    ) -> x509.Certificate:
        """A leaf that cannot sign certificates; its CN is the broker's username for it."""
        if validity.not_after > self.cert.not_valid_after_utc:
            raise ValueError(
                f"validity would end after the issuing CA's "
                f"({self.cert.not_valid_after_utc.isoformat()}): use fewer days"
            )
        eku = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if usage == "server"
            else (ExtendedKeyUsageOID.CLIENT_AUTH)
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity.not_before)
            .not_valid_after(validity.not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def chain_pem(self, leaf: x509.Certificate) -> bytes:
        """Leaf then issuing CA: what a TLS peer sends so the other side needs only the root."""
        return leaf.public_bytes(serialization.Encoding.PEM) + self.cert.public_bytes(
            serialization.Encoding.PEM
        )
