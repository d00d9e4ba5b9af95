"""The registry's typed values. Pure: no I/O.

A `NewMeter` or `NewKey` that exists is valid: every field is checked when the object is
built (hostile CLI flags and CSV cells included), so the database only ever sees clean
values, passed as parameters, and its CHECK constraints are a second line, not the first.
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final
from uuid import UUID

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from meterproof.certs.layout import IDENTITY_RE
from meterproof.registry.errors import InvalidInputError
from meterproof.schemas.reading import Alg
from meterproof.schemas.signatures import InvalidKeyError, load_public_key

MAX_LABEL: Final = 256
MAX_PEM_BYTES: Final = 16_384
MAX_LOCATION_BYTES: Final = 4_096
#: kids and wallet addresses: safe in a log line, a URL and a topic.
_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")
_HEX: Final = frozenset("0123456789abcdef")
#: The EVM zero address: no one holds its key, and GRID (an OpenZeppelin ERC-20) refuses to
#: mint to it (`ERC20InvalidReceiver`), so it can never own a meter or receive its GRID.
EVM_ZERO_ADDRESS: Final = "0x" + "00" * 20
#: The stable reason code of refusing it as a wallet, wherever a wallet is accepted.
ZERO_WALLET: Final = "zero_wallet"


class MeterStatus(StrEnum):
    """The AMI device status; the SQL enum `meter_status` has the same values."""

    PENDING_REGISTRATION = "pending_registration"
    PROVISIONING = "provisioning"
    ACTIVE = "active"
    INACTIVE = "inactive"
    MAINTENANCE = "maintenance"
    FIRMWARE_UPDATE = "firmware_update"
    COMPROMISED = "compromised"
    QUARANTINED = "quarantined"
    DECOMMISSIONED = "decommissioned"


class SecurityLevel(StrEnum):
    BASIC = "basic"
    STANDARD = "standard"
    HIGH = "high"
    CRITICAL_INFRASTRUCTURE = "critical_infrastructure"


class Severity(StrEnum):
    """The SQL enum `security_severity`."""

    INFO = "info"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"
    EMERGENCY = "emergency"


#: Statuses whose readings are accepted (docs/spec/reading-v1.md section 9, rule 3).
ACCEPTING: Final = frozenset(
    {MeterStatus.ACTIVE, MeterStatus.MAINTENANCE, MeterStatus.FIRMWARE_UPDATE}
)


#: How loud a status change is in the security event log.
STATUS_SEVERITY: Final[Mapping[MeterStatus, Severity]] = {
    MeterStatus.PENDING_REGISTRATION: Severity.INFO,
    MeterStatus.PROVISIONING: Severity.INFO,
    MeterStatus.ACTIVE: Severity.INFO,
    MeterStatus.INACTIVE: Severity.LOW,
    MeterStatus.MAINTENANCE: Severity.INFO,
    MeterStatus.FIRMWARE_UPDATE: Severity.INFO,
    MeterStatus.COMPROMISED: Severity.CRITICAL,
    MeterStatus.QUARANTINED: Severity.CRITICAL,
    MeterStatus.DECOMMISSIONED: Severity.MEDIUM,
}


def quoted(value: str, limit: int = 40) -> str:
    """A hostile value quoted for a one-line message: escaped, and cut if long."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"… ({len(value)} chars)"


def check_meter_id(value: str) -> str:
    """The meter_id alphabet of docs/spec/reading-v1.md section 1; `.` and `..` fit it but
    name directories in the PKI."""
    if not IDENTITY_RE.fullmatch(value) or value in {".", ".."}:
        raise InvalidInputError(
            f"invalid meter id {quoted(value)}: 1-64 characters of [A-Za-z0-9._-], not '.' or '..'"
        )
    return value


def check_label(name: str, value: str) -> str:
    """Free text a person typed: 1-256 characters, none of them control or format codes."""
    if not 1 <= len(value) <= MAX_LABEL:
        raise InvalidInputError(f"{name} must be 1 to {MAX_LABEL} characters, not {len(value)}")
    bad = next((c for c in value if unicodedata.category(c).startswith("C")), None)
    if bad is not None:
        raise InvalidInputError(
            f"{name} {quoted(value)} contains control character U+{ord(bad):04X}"
        )
    return value


def check_kid(value: str) -> str:
    if not 1 <= len(value) <= 64 or not set(value) <= _NAME_CHARS:
        raise InvalidInputError(f"invalid kid {quoted(value)}: 1-64 characters of [A-Za-z0-9._:-]")
    return value


def check_wallet(value: str) -> str:
    """An owner wallet as stored: CAIP-10 (or a legacy name) in the safe alphabet, and never
    the EVM zero address (`zero_wallet`)."""
    if not 1 <= len(value) <= 128 or not set(value) <= _NAME_CHARS:
        raise InvalidInputError(
            f"invalid owner wallet {quoted(value)}: 1-128 characters of [A-Za-z0-9._:-]"
        )
    if is_evm_zero_account(value):
        raise InvalidInputError(
            f"invalid owner wallet {quoted(value, 60)} ({ZERO_WALLET}): the EVM zero address"
            " cannot receive GRID; leave the wallet unset (its GRID waits, claimable by meter"
            " id) or give the owner's account"
        )
    return value


def is_evm_zero_account(value: str) -> bool:
    """`eip155:<chain id>:0x00...00` (any case): the account GRID can never be minted to."""
    namespace, _, rest = value.strip().partition(":")
    return namespace == "eip155" and rest.rpartition(":")[2].lower() == EVM_ZERO_ADDRESS


def check_fingerprint(value: str) -> str:
    """SHA-256 of the certificate's DER, as lowercase hex; colons and case are forgiven."""
    digits = value.replace(":", "").lower()
    if len(digits) != 64 or not set(digits) <= _HEX:
        raise InvalidInputError(f"invalid certificate fingerprint {quoted(value)}: 64 hex digits")
    return digits


def check_cert_serial(value: str) -> str:
    digits = value.replace(":", "").lower()
    if not 1 <= len(digits) <= 40 or not set(digits) <= _HEX:
        raise InvalidInputError(f"invalid certificate serial {quoted(value)}: 1-40 hex digits")
    return digits


def parse_location(text: str) -> dict[str, Any]:
    """A JSON object; `gps_coordinates`, if given, must hold a real latitude and longitude."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_LOCATION_BYTES:
        raise InvalidInputError(f"location is longer than {MAX_LOCATION_BYTES} bytes")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(f"location is not valid JSON: {exc}") from None
    return check_location(value)


def check_location(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInputError("location must be a JSON object")
    _check_json_strings(value)
    gps = value.get("gps_coordinates")
    if gps is not None:
        if not isinstance(gps, dict):
            raise InvalidInputError("location.gps_coordinates must be an object")
        for axis, bound in (("latitude", 90), ("longitude", 180)):
            coordinate = gps.get(axis)
            if not isinstance(coordinate, int | float) or isinstance(coordinate, bool):
                raise InvalidInputError(f"location.gps_coordinates.{axis} must be a number")
            if not -bound <= coordinate <= bound:
                raise InvalidInputError(f"location.gps_coordinates.{axis} is out of range")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _check_json_strings(value: object) -> None:
    """jsonb refuses NUL, and a lone surrogate cannot be encoded at all."""
    if isinstance(value, str):
        if "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value):
            raise InvalidInputError("location contains a NUL or a lone surrogate")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_json_strings(key)
            _check_json_strings(item)
    elif isinstance(value, list):
        for item in value:
            _check_json_strings(item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidInputError("location contains a non-finite number")


def default_kid(public_key_pem: str) -> str:
    """First 16 hex digits of SHA-256 over the key's DER SubjectPublicKeyInfo: anyone
    holding the public key computes the same name, without asking the registry."""
    der = serialization.load_pem_public_key(public_key_pem.encode("ascii")).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class NewKey:
    """A signing key to register, bound to its algorithm, its PEM in canonical form."""

    alg: Alg
    public_key_pem: str
    kid: str

    def __post_init__(self) -> None:
        check_kid(self.kid)
        if canonical_pem(self.alg, self.public_key_pem) != self.public_key_pem:
            raise InvalidInputError("public_key_pem is not in canonical form; use NewKey.parse")

    @classmethod
    def parse(cls, alg: str, pem: str | bytes, *, kid: str | None = None) -> NewKey:
        """Validate untrusted input: `alg` one of the four, the PEM a key of that type."""
        try:
            algorithm = Alg(alg)
        except ValueError:
            raise InvalidInputError(
                f"unsupported alg {quoted(alg)}: one of {', '.join(Alg)}"
            ) from None
        canonical = canonical_pem(algorithm, pem)
        return cls(algorithm, canonical, default_kid(canonical) if kid is None else kid)


def canonical_pem(alg: Alg, pem: str | bytes) -> str:
    """The SubjectPublicKeyInfo PEM as `cryptography` writes it, after checking that the
    key fits `alg` (type, curve, RSA size)."""
    if len(pem) > MAX_PEM_BYTES:
        raise InvalidInputError(f"public key is longer than {MAX_PEM_BYTES} bytes")
    try:
        return load_public_key(alg, pem).pem()
    except (InvalidKeyError, UnsupportedAlgorithm, UnicodeError) as exc:
        raise InvalidInputError(f"bad {alg} public key: {_one_line(exc)}") from None


#: The AMI device-identification fields: free text, checked by `check_label`.
LABELS: Final = ("serial", "manufacturer", "model", "firmware_version", "hardware_revision")


@dataclass(frozen=True, slots=True)
class NewMeter:
    meter_id: str
    key: NewKey
    status: MeterStatus = MeterStatus.ACTIVE
    security_level: SecurityLevel = SecurityLevel.STANDARD
    owner_wallet: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    firmware_version: str | None = None
    hardware_revision: str | None = None
    location: Mapping[str, Any] | None = None
    cert_fingerprint: str | None = None
    cert_serial: str | None = None

    def __post_init__(self) -> None:
        check_meter_id(self.meter_id)
        if self.owner_wallet is not None:
            check_wallet(self.owner_wallet)
        for name in LABELS:
            value = getattr(self, name)
            if value is not None:
                check_label(name, value)
        if self.location is not None:
            check_location(dict(self.location))
        if self.cert_fingerprint is not None and check_fingerprint(self.cert_fingerprint) != (
            self.cert_fingerprint
        ):
            raise InvalidInputError("cert_fingerprint must be lowercase hex without colons")
        if self.cert_serial is not None and check_cert_serial(self.cert_serial) != self.cert_serial:
            raise InvalidInputError("cert_serial must be lowercase hex without colons")


@dataclass(frozen=True, slots=True)
class MeterRecord:
    id: UUID
    meter_id: str
    status: MeterStatus
    security_level: SecurityLevel
    owner_wallet: str | None
    serial: str | None
    manufacturer: str | None
    model: str | None
    firmware_version: str | None
    hardware_revision: str | None
    location: dict[str, Any] | None
    capabilities: dict[str, Any]
    security_profile: dict[str, Any]
    cert_fingerprint: str | None
    cert_serial: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def accepts_readings(self) -> bool:
        return self.status in ACCEPTING


@dataclass(frozen=True, slots=True)
class KeyRecord:
    meter_id: str
    kid: str
    alg: Alg
    public_key_pem: str
    valid_from: datetime
    valid_to: datetime | None
    created_at: datetime

    def valid_at(self, when: datetime) -> bool:
        return self.valid_from <= when and (self.valid_to is None or when <= self.valid_to)


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    id: int
    type: str
    severity: Severity
    meter_id: str | None
    detail: dict[str, Any]
    at: datetime


@dataclass(frozen=True, slots=True)
class StatusChange:
    meter_id: str
    old: MeterStatus
    new: MeterStatus

    @property
    def changed(self) -> bool:
        return self.old is not self.new


@dataclass(frozen=True, slots=True)
class KeyRotation:
    added: KeyRecord
    #: kids of the keys that now expire at the end of the overlap
    retiring: tuple[str, ...]


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
