"""Rules 3 to 6 of docs/spec/reading-v1.md section 9: a registered, active meter; a key
registered for the reading's algorithm; a good signature; a plausible timestamp. Pure: the
registry snapshot and the clock are passed in.

A seed-003 provider reading (`Decoded.provider`) goes through the very same rules: its
provider's key is the meter's key whose kid is the provider id, its signature is checked
over the provider's own signed bytes, and its time must be within `provider_skew_ms` of
now both ways, as the seed says (older is `timestamp_skew` too, not `stale_reading`)."""

from __future__ import annotations

from dataclasses import dataclass

from meterproof.ingest.decode import Decoded
from meterproof.ingest.records import Candidate, Rejection
from meterproof.registry.model import ACCEPTING, quoted
from meterproof.registry.snapshots import MeterSnapshot
from meterproof.schemas.reading import MAX_AGE_MS, MAX_FUTURE_MS, RejectReason, b64url_decode


@dataclass(frozen=True, slots=True)
class TimeBounds:
    max_future_ms: int = MAX_FUTURE_MS
    max_age_ms: int = MAX_AGE_MS
    #: Seed 003: a provider's timestamp within +-300 s of the server's clock.
    provider_skew_ms: int = 300_000

    def __post_init__(self) -> None:
        if self.max_future_ms < 0 or self.max_age_ms <= 0 or self.provider_skew_ms < 0:
            raise ValueError("max_future and provider_skew must be >= 0 and max_age > 0")


def verify(  # noqa: PLR0911 - one return per acceptance rule, in the spec's order
    decoded: Decoded, meter: MeterSnapshot | None, *, now_ms: int, bounds: TimeBounds
) -> Candidate | Rejection:
    reading = decoded.reading

    def reject(reason: RejectReason, detail: str) -> Rejection:
        return Rejection(
            decoded.message, reason, detail, reading.meter_id, reading.seq, decoded.reading_hash
        )

    if meter is None:
        return reject(RejectReason.UNKNOWN_METER, "meter is not registered")
    if meter.status not in ACCEPTING:
        return reject(RejectReason.METER_NOT_ACTIVE, f"meter status is {meter.status}")
    keys = [
        k
        for k in meter.keys
        if k.key.alg == reading.alg
        and k.valid_at(now_ms)
        and (reading.kid is None or k.kid == reading.kid)
    ]
    if not keys:  # alg and kid are the sender's text, of any length: quoted short
        kid = f" kid {quoted(reading.kid)}" if reading.kid is not None else ""
        return reject(
            RejectReason.UNSUPPORTED_ALG, f"no valid {quoted(reading.alg)}{kid} key registered"
        )
    signature = b64url_decode(reading.sig)
    if not any(k.key.verify(signature, decoded.signing_bytes) for k in keys):
        return reject(RejectReason.BAD_SIGNATURE, f"signature does not verify ({reading.alg})")
    if decoded.provider:
        if abs(reading.ts - now_ms) > bounds.provider_skew_ms:
            return reject(
                RejectReason.TIMESTAMP_SKEW,
                f"timestamp is {(reading.ts - now_ms) / 1000:+.0f} s from the server's clock,"
                f" beyond +-{bounds.provider_skew_ms // 1000} s",
            )
    elif reading.ts > now_ms + bounds.max_future_ms:
        return reject(RejectReason.TIMESTAMP_SKEW, f"ts is {reading.ts - now_ms} ms ahead")
    elif reading.ts < now_ms - bounds.max_age_ms:
        return reject(RejectReason.STALE_READING, f"ts is {now_ms - reading.ts} ms old")
    return Candidate(
        decoded.message, reading, decoded.signing_bytes, decoded.reading_hash, verified_at_ms=now_ms
    )
