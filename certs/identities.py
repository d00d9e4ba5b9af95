"""Client identities (meters, services, integrators): one namespace of certificate CNs.

The broker maps a client to its role by the certificate's CN alone, so a name may exist
under one role only: a meter called `ingest` would otherwise act as an ingest worker.
A meter gets two unrelated key pairs: an EC P-256 TLS key for the broker, and a signing
key for its readings (even for ES256, a separate P-256 key), so either can be rotated or
kept in different hardware without touching the other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meterproof.certs.authority import Authority, Validity, fingerprint, serial_hex
from meterproof.certs.errors import IdentityConflictError
from meterproof.certs.keys import private_pem, publish_directory
from meterproof.certs.layout import DeviceFiles, IdentityFiles, PkiLayout
from meterproof.schemas.reading import Alg
from meterproof.schemas.signatures import generate_private_key

Role = Literal["meter", "service", "integrator"]
ServiceName = Literal["ingest", "bridge", "api", "admin"]
#: Service roles. Each ingest worker has an identity of its own, `ingest-<instance>`: the
#: broker makes the certificate CN the MQTT client id (use_username_as_clientid), so one
#: certificate is one connection and one persistent session, and a meter cannot present a
#: worker's client id. `bridge`, `api` (the HTTP API's republisher: it may only publish
#: what an ingest worker announces) and `admin` (operators' tools on the TLS listener) are
#: one identity each. All these names are reserved even before they are issued; `ingest` alone
#: is reserved too (earlier versions issued it; it has no topic rights any more).
SERVICE_NAMES: Final[tuple[ServiceName, ...]] = get_args(ServiceName)
API_IDENTITY: Final[ServiceName] = "api"
INGEST_IDENTITY_RE: Final = re.compile(r"^ingest-(0|[1-9][0-9]{0,3})$")
MAX_INGEST_INSTANCES: Final = 10_000
DEFAULT_DAYS: Final = 825


def ingest_identity(instance: int) -> str:
    """The certificate CN (and so the MQTT client id) of ingest worker `instance`."""
    if not 0 <= instance < MAX_INGEST_INSTANCES:
        raise ValueError(f"ingest instance must be in 0..{MAX_INGEST_INSTANCES - 1}: {instance}")
    return f"ingest-{instance}"


def ingest_instance(identity: str) -> int:
    """The inverse of `ingest_identity`; ValueError for any other name."""
    if not INGEST_IDENTITY_RE.fullmatch(identity):
        raise ValueError(f"{identity!r} is not an ingest worker identity (ingest-<0..9999>)")
    return int(identity.removeprefix("ingest-"))


def is_reserved(name: str) -> bool:
    """A service name or an ingest worker identity: never a meter or integrator CN, because
    the broker grants rights by CN and a meter called `ingest-7` would read every reading
    once the ACL is rendered for ingest worker 7."""
    return name in SERVICE_NAMES or INGEST_IDENTITY_RE.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class IdentityRecord:
    """The contents of `identity.json`: what the registry and the operator need to know."""

    role: Role
    name: str
    serial: str
    sha256_fingerprint: str
    not_before: datetime
    not_after: datetime
    alg: Alg | None = None

    @classmethod
    def of(cls, cert: x509.Certificate, role: Role, name: str, alg: Alg | None) -> IdentityRecord:
        return cls(
            role=role,
            name=name,
            serial=serial_hex(cert),
            sha256_fingerprint=fingerprint(cert),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            alg=alg,
        )

    def to_json(self) -> bytes:
        data: dict[str, Any] = {"role": self.role, "name": self.name}
        if self.role == "meter":
            data |= {"meter_id": self.name, "alg": str(self.alg)}
        data |= {
            "serial": self.serial,
            "sha256_fingerprint": self.sha256_fingerprint,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
        }
        return json.dumps(data, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> IdentityRecord:
        data = json.loads(raw)
        return cls(
            role=data["role"],
            name=data["name"],
            serial=data["serial"],
            sha256_fingerprint=data["sha256_fingerprint"],
            not_before=datetime.fromisoformat(data["not_before"]),
            not_after=datetime.fromisoformat(data["not_after"]),
            alg=Alg(data["alg"]) if "alg" in data else None,
        )


@dataclass(frozen=True, slots=True)
class IssuedDevice:
    """A freshly issued meter, with what `meters register` needs in memory."""

    files: DeviceFiles
    record: IdentityRecord
    public_key_pem: str


def _locations(layout: PkiLayout, name: str) -> Iterator[tuple[Role, IdentityFiles]]:
    yield "meter", layout.device(name)
    yield "service", layout.service(name)
    yield "integrator", layout.integrator(name)


def check_name_free(layout: PkiLayout, name: str, role: Role) -> None:
    """Raise IdentityConflictError if `name` is a CN of any role, or a reserved service."""
    if is_reserved(name) and role != "service":
        raise IdentityConflictError(f"{name!r} is reserved for a service identity")
    for other, files in _locations(layout, name):
        if files.directory.exists():
            raise IdentityConflictError(f"{name!r} already exists as a {other} identity")


def load_identity(files: IdentityFiles) -> IdentityRecord:
    return IdentityRecord.from_json(files.meta.read_bytes())


def list_identities(layout: PkiLayout) -> list[tuple[IdentityFiles, IdentityRecord]]:
    """Every published identity, by role then name (staging leftovers are not listed)."""
    found = []
    for parent in (layout.devices_dir, layout.services_dir, layout.integrators_dir):
        if not parent.is_dir():
            continue
        for directory in sorted(parent.iterdir()):
            files = IdentityFiles(directory)
            if files.meta.is_file():
                found.append((files, load_identity(files)))
    return found


def _publish(
    layout: PkiLayout,
    authority: Authority,
    files: IdentityFiles,
    *,
    role: Role,
    alg: Alg | None = None,
    validity: Validity,
    public: Mapping[str, bytes] | None = None,
    private: Mapping[str, bytes] | None = None,
) -> IdentityRecord:
    name = files.directory.name
    tls_key = ec.generate_private_key(ec.SECP256R1())
    cert = authority.issue(name, tls_key.public_key(), usage="client", validity=validity)
    record = IdentityRecord.of(cert, role, name, alg)
    try:
        publish_directory(
            files.directory,
            layout.staging_dir,
            public={
                files.cert.name: authority.chain_pem(cert),
                files.meta.name: record.to_json(),
                **(public or {}),
            },
            private={files.key.name: private_pem(tls_key), **(private or {})},
        )
    except FileExistsError as exc:
        raise IdentityConflictError(f"{name!r} was issued concurrently") from exc
    return record


def issue_meter(
    layout: PkiLayout,
    authority: Authority,
    meter_id: str,
    *,
    alg: Alg,
    rsa_bits: int,
    validity: Validity,
) -> IssuedDevice:
    """The work of `issue_device` with the CA already loaded, for bulk issuance."""
    files = layout.device(meter_id)
    check_name_free(layout, meter_id, "meter")
    signing = generate_private_key(alg, rsa_bits=rsa_bits)
    public_key_pem = signing.public_key().pem()
    record = _publish(
        layout,
        authority,
        files,
        role="meter",
        alg=alg,
        validity=validity,
        public={files.signing_pub.name: public_key_pem.encode("ascii")},
        private={files.signing_key.name: signing.pem()},
    )
    return IssuedDevice(files, record, public_key_pem)


def issue_device(
    layout: PkiLayout,
    meter_id: str,
    *,
    alg: Alg | str = Alg.EDDSA,
    rsa_bits: int = 4096,
    days: int = DEFAULT_DAYS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> DeviceFiles:
    """A meter's TLS identity and signing key pair; `rsa_bits` only matters for RS/PS256.

    Explicit `not_before`/`not_after` (timezone-aware) override `days`, so tests can make
    an already expired or not yet valid certificate.
    """
    validity = Validity.of(days, not_before=not_before, not_after=not_after)
    authority = Authority.load(layout)
    return issue_meter(
        layout, authority, meter_id, alg=Alg(alg), rsa_bits=rsa_bits, validity=validity
    ).files


def issue_service(
    layout: PkiLayout, role: ServiceName, *, instance: int | None = None, days: int = DEFAULT_DAYS
) -> IdentityFiles:
    """Issue `bridge`, `api`, `admin`, or ingest worker `instance` (`ingest-<instance>`).

    Ingest needs an instance number: one certificate per worker process, so a worker that
    restarts finds its own session and no two workers can take over each other's.
    """
    if role not in SERVICE_NAMES:
        raise ValueError(f"unknown service {role!r}: one of {', '.join(SERVICE_NAMES)}")
    if (role == "ingest") != (instance is not None):
        raise ValueError("an instance number is required for ingest, and only for ingest")
    name = role if instance is None else ingest_identity(instance)
    files = layout.service(name)
    check_name_free(layout, name, "service")
    _publish(layout, Authority.load(layout), files, role="service", validity=Validity.of(days))
    return files


def issue_ingest_workers(
    layout: PkiLayout, count: int, *, days: int = DEFAULT_DAYS
) -> tuple[str, ...]:
    """Make sure `ingest-0` .. `ingest-<count-1>` exist; return the names issued now."""
    if not 1 <= count <= MAX_INGEST_INSTANCES:
        raise ValueError(f"count must be in 1..{MAX_INGEST_INSTANCES}, not {count}")
    issued = []
    for instance in range(count):
        if not layout.service(ingest_identity(instance)).directory.exists():
            issue_service(layout, "ingest", instance=instance, days=days)
            issued.append(ingest_identity(instance))
    return tuple(issued)


def issue_integrator(
    layout: PkiLayout,
    name: str,
    *,
    days: int = DEFAULT_DAYS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> IdentityFiles:
    """A read-only consumer of `verified/#` and `ledger/#`, known to the broker by CN."""
    files = layout.integrator(name)
    check_name_free(layout, name, "integrator")
    validity = Validity.of(days, not_before=not_before, not_after=not_after)
    _publish(layout, Authority.load(layout), files, role="integrator", validity=validity)
    return files
