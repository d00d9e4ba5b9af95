"""Rules 1 and 2 of docs/spec/reading-v1.md section 9: the payload is a reading, for its own
topic."""

from __future__ import annotations

import re
from dataclasses import dataclass

from meterproof.ingest.records import Message, Rejection
from meterproof.schemas import topics
from meterproof.schemas.codec import MalformedPayload, decode_reading
from meterproof.schemas.reading import RejectReason, SignedReading
from meterproof.schemas.signing import reading_hash, signing_bytes

#: The meter_id alphabet of docs/spec/reading-v1.md section 1.
_METER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class Decoded:
    message: Message
    reading: SignedReading
    signing_bytes: bytes
    reading_hash: bytes


def topic_meter_id(topic: str) -> str | None:
    """The publisher: the broker ACL lets only meter X write `meters/X/readings`. A segment
    outside the meter-id alphabet names no meter (and must not reach a query or the
    quarantine: a NUL there would make the batch unstorable and retried for ever)."""
    meter_id = topics.meter_of_readings(topic)
    return meter_id if meter_id is not None and _METER_ID.fullmatch(meter_id) else None


def decode(message: Message) -> Decoded | Rejection:
    try:
        reading = decode_reading(message.payload)
    except MalformedPayload as exc:
        return Rejection(
            message, RejectReason.MALFORMED, str(exc), meter_id=topic_meter_id(message.topic)
        )
    message_bytes = signing_bytes(reading)
    digest = reading_hash(message_bytes)
    # The exact topic of a valid meter_id: no alphabet check needed on this, the hot path.
    if message.topic != topics.readings(reading.meter_id):
        return Rejection(
            message,
            RejectReason.TOPIC_MISMATCH,
            f"payload meter_id {reading.meter_id!r} on topic {message.topic!r}",
            meter_id=topic_meter_id(message.topic),
            seq=reading.seq,
            reading_hash=digest,
        )
    return Decoded(message, reading, message_bytes, digest)
