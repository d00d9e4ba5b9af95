"""Rules 1 and 2 of docs/spec/reading-v1.md section 9: the payload is a reading, for its own
topic. A seed-003 provider reading (only the API delivers those, on `providers/{meter}/
readings`) is decoded here too, into the reading-v1 reading it stands for
(`schemas.provider`), so every later stage judges it as any other; its `signing_bytes` are
the provider's own signed bytes, which verify checks and the API's store keeps."""

from __future__ import annotations

import re
from dataclasses import dataclass

from meterproof.ingest.records import Message, Rejection
from meterproof.schemas import provider, topics
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
    #: A seed-003 provider reading: its time is bounded as the seed says (ingest.verify).
    provider: bool = False


def topic_meter_id(topic: str) -> str | None:
    """The publisher: the broker ACL lets only meter X write `meters/X/readings`. A segment
    outside the meter-id alphabet names no meter (and must not reach a query or the
    quarantine: a NUL there would make the batch unstorable and retried for ever)."""
    meter_id = topics.meter_of_readings(topic)
    if meter_id is None:
        meter_id = provider.meter_of_topic(topic)
    return meter_id if meter_id is not None and _METER_ID.fullmatch(meter_id) else None


def decode(message: Message) -> Decoded | Rejection:
    if message.topic.startswith("p"):  # one byte compared on the hot path
        found = provider.meter_of_topic(message.topic)
        if found is not None:
            return _decode_provider(message, found)
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


def _decode_provider(message: Message, meter_id: str) -> Decoded | Rejection:
    """Rules 1-2 for a provider reading: it parses, and names the topic's meter."""
    try:
        original = provider.parse(message.payload)
        reading = provider.as_reading(original)
    except MalformedPayload as exc:
        return Rejection(
            message, RejectReason.MALFORMED, str(exc), meter_id=topic_meter_id(message.topic)
        )
    digest = reading_hash(signing_bytes(reading))
    if reading.meter_id != meter_id:
        return Rejection(
            message,
            RejectReason.TOPIC_MISMATCH,
            f"meter_address {reading.meter_id!r} on topic {message.topic!r}",
            meter_id=topic_meter_id(message.topic),
            seq=reading.seq,
            reading_hash=digest,
        )
    return Decoded(message, reading, provider.reading_signing_bytes(original), digest, True)
