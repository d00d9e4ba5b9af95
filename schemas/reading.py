"""The messages of docs/spec/reading-v1.md: the signed reading, the receipt, the verified reading.

The models are strict on purpose: two parsers must never disagree about what was signed,
so anything the spec does not allow (unknown fields, floats, nulls, out-of-range integers,
padded or non-canonical base64url) is refused here rather than normalised.
"""

from __future__ import annotations

import base64
import binascii
from enum import StrEnum
from typing import Annotated, Any, Final

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

MAX_PAYLOAD_BYTES: Final = 4096
U64_MAX: Final = 2**64 - 1
I64_MIN: Final = -(2**63)
I64_MAX: Final = 2**63 - 1
#: Section 9 rule 6: how far a reading's `ts` may be ahead of the receiver's clock, and
#: behind it, by default (the ingest workers' `max_future_s` and `max_age_s`).
MAX_FUTURE_MS: Final = 300_000
MAX_AGE_MS: Final = 7 * 24 * 3600 * 1000

#: The optional signed fields in signing-mask bit order (docs/spec/reading-v1.md section 6).
OPTIONAL_FIELDS: Final = (
    "power_w",
    "voltage_mv",
    "current_ma",
    "frequency_mhz",
    "power_factor_milli",
)


class Alg(StrEnum):
    """Signature algorithms a key can be registered for."""

    EDDSA = "EdDSA"
    ES256 = "ES256"
    RS256 = "RS256"
    PS256 = "PS256"


class RejectReason(StrEnum):
    """The spec's reason codes: the only label a rejection ever carries."""

    MALFORMED = "malformed"
    TOPIC_MISMATCH = "topic_mismatch"
    UNKNOWN_METER = "unknown_meter"
    METER_NOT_ACTIVE = "meter_not_active"
    UNSUPPORTED_ALG = "unsupported_alg"
    BAD_SIGNATURE = "bad_signature"
    TIMESTAMP_SKEW = "timestamp_skew"
    STALE_READING = "stale_reading"
    SEQ_REUSED = "seq_reused"
    REGISTER_DECREASED = "register_decreased"
    RATE_LIMITED = "rate_limited"
    STORE_REFUSED = "store_refused"


class ReceiptStatus(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


def _canonical_b64url(value: str) -> str:
    """Only the one canonical unpadded encoding of a byte string is accepted."""
    if "=" in value or len(value) % 4 == 1:
        raise ValueError("sig must be unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("sig is not base64url") from exc
    if b64url(raw) != value:
        raise ValueError("sig is not canonical base64url")
    return value


def b64url(raw: bytes) -> str:
    """Unpadded base64url, the encoding of `sig` on the wire."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


U64 = Annotated[int, Field(ge=0, le=U64_MAX)]
I64 = Annotated[int, Field(ge=I64_MIN, le=I64_MAX)]
MeterId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
Sig = Annotated[
    str,
    Field(pattern=r"^[A-Za-z0-9_-]*$", description="unpadded base64url"),
    AfterValidator(_canonical_b64url),
]
HashHex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
OptionalI64 = I64 | SkipJsonSchema[None]


def _absent_not_null(schema: dict[str, Any]) -> None:
    """Optional fields are omitted, never null: the schema must not advertise a null default."""
    for prop in schema.get("properties", {}).values():
        if prop.get("default", 0) is None:
            del prop["default"]


class SignedReading(BaseModel):
    """A meter's signed reading as published on `meters/{meter_id}/readings`."""

    model_config = ConfigDict(
        strict=True, extra="forbid", frozen=True, json_schema_extra=_absent_not_null
    )

    v: int = Field(ge=1, le=1, description="format version; only 1 exists")
    meter_id: MeterId
    seq: U64 = Field(description="per-meter nonce, strictly increasing, never reused")
    ts: U64 = Field(description="unix epoch milliseconds when the meter took the reading")
    import_wh: U64 = Field(description="cumulative energy drawn from the grid, Wh (OBIS 1.8.0)")
    export_wh: U64 = Field(description="cumulative energy delivered to the grid, Wh (2.8.0)")
    power_w: OptionalI64 = Field(default=None, description="net active power, W; + = importing")
    voltage_mv: OptionalI64 = Field(default=None, description="RMS voltage, mV")
    current_ma: OptionalI64 = Field(default=None, description="RMS current, mA")
    frequency_mhz: OptionalI64 = Field(default=None, description="grid frequency, mHz")
    power_factor_milli: OptionalI64 = Field(default=None, description="power factor x 1000")
    #: Any string: one that names no registered key is `unsupported_alg` (rule 4), not
    #: `malformed`, as the shared contract says; only the payload's size bounds it.
    alg: str = Field(description="EdDSA, ES256, RS256 or PS256")
    sig: Sig
    kid: str | SkipJsonSchema[None] = Field(default=None, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:  # noqa: ANN401 - pydantic hands over raw input
        """Optional means absent: an explicit null is not an integer."""
        if isinstance(data, dict) and None in data.values():
            raise ValueError("null is not a valid value; omit the field instead")
        return data

    def wire_dict(self) -> dict[str, Any]:
        """The fields as they travel: absent optionals stay absent."""
        return self.model_dump(exclude_none=True)


class Receipt(BaseModel):
    """Sent to `meters/{meter_id}/receipts` once a reading's fate is durable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    seq: U64 | None = Field(description="null only when the payload could not be parsed")
    reading_hash: HashHex | None = Field(description="null when the payload could not be parsed")
    status: ReceiptStatus
    reason: RejectReason | None = None


class VerifiedReading(SignedReading):
    """Republished on `verified/{meter_id}/readings`: re-verifiable byte for byte."""

    reading_hash: HashHex
    verified_at: U64 = Field(description="unix epoch milliseconds of verification")
