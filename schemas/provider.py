"""Seed 003's provider format: its two bodies, the bytes a provider signs, and how one of
its readings maps onto reading-v1 so the ingest pipeline judges, stores and anchors it
like any other (docs/api.md, "Seed 003's provider format").

A provider signs `provider_id || meter_address || total_kwh || timestamp || nonce` (the
integers as u64 little-endian) with Ed25519, base64 (standard alphabet, padded). Mapped:

    meter_id = meter_address      seq = nonce              kid = provider_id
    ts = timestamp * 1000 (ms)    export_wh = total_kwh * 1000, import_wh = 0
    alg = EdDSA                   sig = the same 64 signature bytes, base64url

`export_wh`: a provider delivers energy, and exports are what the ledger mints. The
reading's `reading_hash` is reading-v1's, over the mapped fields (so `ledger verify` and
proofs work unchanged); the provider's own signed bytes are kept beside it
(`provider_readings`), and `original_of` turns them back into the mapped reading, which
is how a third party goes from a kept signature to an anchored leaf.

The seed's concatenation has no lengths, so (`ab`, `cd`) and (`a`, `bcd`) sign the same
bytes: a provider's key is registered for one provider id and one meter only, and a
public key is never registered twice (db/migrations/0008), so no other split verifies.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meterproof.schemas.codec import MalformedPayload, first_error, keys_repeat, load_object
from meterproof.schemas.reading import (
    U64,
    U64_MAX,
    Alg,
    MeterId,
    SignedReading,
    b64url,
)
from meterproof.schemas.signatures import Ed25519Public

WH_PER_KWH: Final = 1000
MS_PER_S: Final = 1000
#: The largest `total_kwh` whose Wh still fit reading-v1's u64 registers.
MAX_TOTAL_KWH: Final = U64_MAX // WH_PER_KWH
#: The largest `timestamp` whose ms still fit reading-v1's u64 `ts`.
MAX_TIMESTAMP_S: Final = U64_MAX // MS_PER_S
#: The internal topic of a provider reading inside the API's pipeline; never on the broker.
_TOPIC_PREFIX: Final = "providers/"
_TOPIC_SUFFIX: Final = "/readings"
#: Domain separation of the registration's proof of possession (not in the seed).
REGISTRATION_MAGIC: Final = b"meterproof/provider-registration/v1"
_U64_LE: Final = struct.Struct("<Q")

ProviderId = Annotated[
    str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="also the key's kid")
]
Signature = Annotated[
    str,
    Field(pattern=r"^[A-Za-z0-9+/]{86}==$", description="base64 of the 64 Ed25519 bytes"),
]
PublicKeyB64 = Annotated[
    str,
    Field(pattern=r"^[A-Za-z0-9+/]{43}=$", description="base64 of the 32 Ed25519 bytes"),
]
Label = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[\x20-\x7e]+$")]


class ProviderReading(BaseModel):
    """The body of `POST /energy/reading/submit`, exactly as seed 003 gives it."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    provider_id: ProviderId
    meter_address: MeterId
    total_kwh: int = Field(ge=0, le=MAX_TOTAL_KWH, description="cumulative kWh delivered")
    timestamp: int = Field(ge=0, le=MAX_TIMESTAMP_S, description="unix epoch seconds")
    signature: Signature
    nonce: U64 = Field(description="per provider, never reused, increasing")


class ProviderRegistration(BaseModel):
    """The body of `POST /energy/provider/register`, exactly as seed 003 gives it."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    provider_id: ProviderId
    owner: Label
    location: Label
    capacity_kwh: U64
    price_per_kwh: U64
    meter_address: MeterId
    stake_amount_ct: U64
    public_key: PublicKeyB64
    signature: Signature


def signing_bytes(
    provider_id: str, meter_address: str, total_kwh: int, timestamp: int, nonce: int
) -> bytes:
    """Seed 003's signed message, byte for byte."""
    return b"".join(
        (
            provider_id.encode("ascii"),
            meter_address.encode("ascii"),
            _U64_LE.pack(total_kwh),
            _U64_LE.pack(timestamp),
            _U64_LE.pack(nonce),
        )
    )


def reading_signing_bytes(reading: ProviderReading) -> bytes:
    return signing_bytes(
        reading.provider_id, reading.meter_address, reading.total_kwh, reading.timestamp,
        reading.nonce,
    )  # fmt: skip


def registration_bytes(r: ProviderRegistration) -> bytes:
    """What the registration's `signature` covers (the seed does not say; ours): the magic,
    then every field but the signature, strings with a one-byte length, integers u64 LE,
    the 32 public key bytes last. It proves the registrant holds the key."""
    strings = (r.provider_id, r.owner, r.location, r.meter_address)
    return b"".join(
        (
            REGISTRATION_MAGIC,
            *(bytes((len(s),)) + s.encode("ascii") for s in strings),
            _U64_LE.pack(r.capacity_kwh),
            _U64_LE.pack(r.price_per_kwh),
            _U64_LE.pack(r.stake_amount_ct),
            b64decode(r.public_key),
        )
    )


def registration_verifies(r: ProviderRegistration) -> bool:
    """The registration's signature is the registrant's key over `registration_bytes`."""
    try:
        key = Ed25519Public(b64decode(r.public_key))
    except ValueError:  # not a point on the curve
        return False
    return key.verify(b64decode(r.signature), registration_bytes(r))


def b64decode(value: str) -> bytes:
    """Standard base64, validated (the models' patterns already fix the length)."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedPayload(f"not base64: {exc}") from None


def b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def topic(meter_address: str) -> str:
    """The pipeline-internal topic a provider reading for `meter_address` travels on."""
    return f"{_TOPIC_PREFIX}{meter_address}{_TOPIC_SUFFIX}"


def meter_of_topic(value: str) -> str | None:
    """The meter a provider topic names, unchecked; None for any other topic."""
    if value.startswith(_TOPIC_PREFIX) and value.endswith(_TOPIC_SUFFIX):
        middle = value[len(_TOPIC_PREFIX) : -len(_TOPIC_SUFFIX)]
        if middle and "/" not in middle:
            return middle
    return None


def parse(payload: bytes) -> ProviderReading:
    """One submit body, or `MalformedPayload` saying why (a key given twice included: two
    parsers must not disagree about what was signed)."""
    obj = load_object(payload)
    try:
        reading = ProviderReading.model_validate(obj)
    except ValidationError as exc:
        raise MalformedPayload(first_error(exc)) from None
    if keys_repeat(payload):
        raise MalformedPayload("a key is given twice")
    return reading


def as_reading(reading: ProviderReading) -> SignedReading:
    """The reading-v1 reading a provider reading stands for (the module's mapping)."""
    fields: dict[str, Any] = {
        "v": 1,
        "meter_id": reading.meter_address,
        "seq": reading.nonce,
        "ts": reading.timestamp * MS_PER_S,
        "import_wh": 0,
        "export_wh": reading.total_kwh * WH_PER_KWH,
        "alg": Alg.EDDSA.value,
        "kid": reading.provider_id,
        "sig": b64url(b64decode(reading.signature)),
    }
    try:
        return SignedReading.model_validate(fields)
    except ValidationError as exc:  # not reachable from a valid ProviderReading
        raise MalformedPayload(f"no reading-v1 reading: {exc.errors()[0]['msg']}") from None


def original_of(signed: bytes, provider_id: str, meter_address: str) -> dict[str, int]:
    """The integers of kept signed bytes, given the two names they start with (stored
    beside them): `total_kwh`, `timestamp`, `nonce`; ValueError if the bytes are not theirs."""
    head = provider_id.encode("ascii") + meter_address.encode("ascii")
    if len(signed) != len(head) + 3 * _U64_LE.size or not signed.startswith(head):
        raise ValueError("the signed bytes do not start with this provider and meter")
    total_kwh, timestamp, nonce = struct.unpack_from("<QQQ", signed, len(head))
    return {"total_kwh": total_kwh, "timestamp": timestamp, "nonce": nonce}
