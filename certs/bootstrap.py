"""`certs init`: everything the stack needs before its first start, created only if missing.

An existing CA is never replaced (there is deliberately no `--force`): every meter, service
and registered fingerprint depends on it. Only missing pieces around it are (re)created:
the broker certificate, the CRL (or a stale one re-signed), the oracle key, the services.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from meterproof.certs.authority import (
    Authority,
    CaKeyType,
    Validity,
    create_ca,
    describe_root,
    subject_alt_names,
)
from meterproof.certs.crl import crl_is_fresh, refresh_crl
from meterproof.certs.errors import PkiError
from meterproof.certs.identities import (
    DEFAULT_DAYS,
    ServiceName,
    issue_ingest_workers,
    issue_service,
)
from meterproof.certs.keys import private_pem, public_pem, publish_directory
from meterproof.certs.layout import PkiLayout

DEFAULT_CA_DAYS: Final = 3650
#: Always in the broker certificate: the local stack listens on loopback.
DEFAULT_SERVER_NAMES: Final = ("localhost", "127.0.0.1")
#: Ingest worker identities issued by default: enough for `meterproof ingest --workers 2`.
DEFAULT_INGEST_WORKERS: Final = 2


@dataclass(frozen=True, slots=True)
class InitResult:
    ca_created: bool
    ca_key: str
    server_created: bool
    crl_written: bool
    oracle_created: bool
    services_created: tuple[str, ...]


def _incomplete(path: Path) -> PkiError:
    return PkiError(f"{path} exists but is incomplete: inspect it and move it away")


def _ensure_ca(layout: PkiLayout, ca_key: CaKeyType, days: int) -> bool:
    if layout.ca_cert.exists():
        if not layout.issuing_cert.exists():
            raise _incomplete(layout.ca_dir)
        return False
    if layout.ca_dir.exists():
        raise _incomplete(layout.ca_dir)
    create_ca(layout, key_type=ca_key, days=days)
    return True


def _ensure_server(layout: PkiLayout, authority: Authority, names: Sequence[str]) -> bool:
    if layout.server_cert.exists() and layout.server_key.exists():
        return False
    directory = layout.server_cert.parent
    if directory.exists():
        raise _incomplete(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    all_names = [*DEFAULT_SERVER_NAMES, *names]
    cert = authority.issue(
        all_names[0],
        key.public_key(),
        usage="server",
        validity=Validity.of(DEFAULT_DAYS),
        alt_names=subject_alt_names(all_names),
    )
    publish_directory(
        directory,
        layout.staging_dir,
        public={layout.server_cert.name: authority.chain_pem(cert)},
        private={layout.server_key.name: private_pem(key)},
    )
    return True


def _ensure_oracle(layout: PkiLayout) -> bool:
    """The bridge's Ed25519 key that signs ledger entries; not part of the X.509 PKI."""
    if layout.oracle_key.exists() and layout.oracle_pub.exists():
        return False
    directory = layout.oracle_key.parent
    if directory.exists():
        raise _incomplete(directory)
    key = ed25519.Ed25519PrivateKey.generate()
    publish_directory(
        directory,
        layout.staging_dir,
        public={layout.oracle_pub.name: public_pem(key.public_key())},
        private={layout.oracle_key.name: private_pem(key)},
    )
    return True


def init_pki(
    layout: PkiLayout,
    *,
    ca_key: CaKeyType = "rsa4096",
    server_names: Sequence[str] = (),
    days: int = DEFAULT_CA_DAYS,
    ingest_workers: int = DEFAULT_INGEST_WORKERS,
) -> InitResult:
    """Create what is missing; `days` is the CA's validity, `server_names` extra SANs,
    `ingest_workers` how many ingest worker identities (`ingest-0` ..) must exist."""
    ca_created = _ensure_ca(layout, ca_key, days)
    authority = Authority.load(layout)
    server_created = _ensure_server(layout, authority, server_names)
    crl_written = not crl_is_fresh(layout)
    if crl_written:
        refresh_crl(layout)
    oracle_created = _ensure_oracle(layout)
    services = issue_ingest_workers(layout, ingest_workers)
    singletons: tuple[ServiceName, ...] = ("bridge", "api", "admin")
    for role in singletons:
        if not layout.service(role).directory.exists():
            issue_service(layout, role)
            services += (role,)
    return InitResult(
        ca_created=ca_created,
        ca_key=describe_root(layout),
        server_created=server_created,
        crl_written=crl_written,
        oracle_created=oracle_created,
        services_created=services,
    )
