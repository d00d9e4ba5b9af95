"""Where the PKI keeps its files, in one place, so the broker config, the stack runner,
the meter client and the registry all agree on paths without passing them around."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from meterproof.config import DEFAULT_PKI_ROOT

#: The spec's meter id alphabet (docs/spec/reading-v1.md section 1); also used for service and
#: integrator names so that every identity is safe in a topic, a path and a CN.
IDENTITY_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True, slots=True)
class IdentityFiles:
    """A TLS client identity (meter, service or integrator): key, certificate, metadata."""

    directory: Path

    @property
    def cert(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def key(self) -> Path:
        return self.directory / "tls.key"

    @property
    def meta(self) -> Path:
        return self.directory / "identity.json"


@dataclass(frozen=True, slots=True)
class DeviceFiles(IdentityFiles):
    """A meter: its TLS identity plus the reading-signing key pair."""

    @property
    def signing_key(self) -> Path:
        return self.directory / "signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.directory / "signing.pub.pem"


@dataclass(frozen=True, slots=True)
class PkiLayout:
    root: Path = DEFAULT_PKI_ROOT

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / "ca.key"

    @property
    def issuing_cert(self) -> Path:
        """The EC P-256 CA under the root that signs every leaf and the CRL."""
        return self.ca_dir / "issuing.crt"

    @property
    def issuing_key(self) -> Path:
        return self.ca_dir / "issuing.key"

    @property
    def crl(self) -> Path:
        return self.ca_dir / "crl.pem"

    @property
    def revoked_index(self) -> Path:
        """JSON list of revoked serials, the source the CRL is rebuilt from."""
        return self.ca_dir / "revoked.json"

    @property
    def server_cert(self) -> Path:
        return self.root / "server" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server" / "server.key"

    @property
    def oracle_key(self) -> Path:
        return self.root / "oracle" / "oracle.key"

    @property
    def oracle_pub(self) -> Path:
        return self.root / "oracle" / "oracle.pub.pem"

    @property
    def devices_dir(self) -> Path:
        return self.root / "devices"

    @property
    def services_dir(self) -> Path:
        return self.root / "services"

    @property
    def integrators_dir(self) -> Path:
        return self.root / "integrators"

    @property
    def staging_dir(self) -> Path:
        """Where a directory of files is written before one rename publishes it whole."""
        return self.root / ".staging"

    def device(self, meter_id: str) -> DeviceFiles:
        return DeviceFiles(self.devices_dir / check_identity(meter_id))

    def service(self, name: str) -> IdentityFiles:
        """A service identity: `ingest-<instance>` per ingest worker, `bridge`, `api`, `admin`."""
        return IdentityFiles(self.services_dir / check_identity(name))

    def integrator(self, name: str) -> IdentityFiles:
        return IdentityFiles(self.integrators_dir / check_identity(name))


def check_identity(name: str) -> str:
    """`.` and `..` fit the alphabet but would name a parent directory, so they are refused."""
    if not IDENTITY_RE.fullmatch(name) or name in {".", ".."}:
        raise ValueError(
            f"invalid identity {name!r}: 1-64 characters of [A-Za-z0-9._-], not '.' or '..'"
        )
    return name
