"""What the worker tells the world after a commit: the receipt to the publishing meter and
the verified reading to integrators. Pure builders; the source's client sends them.

Both are formatted as bytes directly: two per reading, they are on the hot path, and a
dict through orjson (or a model dump) cost several microseconds each."""

from __future__ import annotations

from typing import Final

from meterproof.ingest.decode import topic_meter_id
from meterproof.ingest.records import Candidate, Outcome, receipt_fields
from meterproof.schemas import topics

_RECEIPT: Final = b'{"seq":%s,"reading_hash":%s,"status":"%s","reason":%s}'
_VERIFIED_TAIL: Final = b',"reading_hash":"%s","verified_at":%d}'


def receipt(outcome: Outcome) -> tuple[str, bytes] | None:
    """The receipt goes to the meter that published (its topic), even for a payload that
    names another meter or cannot be parsed; None if the topic names no meter."""
    publisher = topic_meter_id(outcome.message.topic)
    if publisher is None:
        return None
    seq, digest, status, reason = receipt_fields(outcome)
    body = _RECEIPT % (
        b"null" if seq is None else b"%d" % seq,
        b"null" if digest is None else b'"%s"' % digest.hex().encode(),
        status.value.encode(),
        b"null" if reason is None else b'"%s"' % reason.value.encode(),
    )
    return topics.receipts(publisher), body


def verified(candidate: Candidate) -> tuple[str, bytes]:
    """The signed fields as received, plus `reading_hash` and `verified_at`
    (docs/spec/reading-v1.md section 13).

    The received payload is reused byte for byte: decode proved it one flat JSON object
    with nothing but whitespace after it and none of the two added keys, so the object is
    extended before its closing brace."""
    body = candidate.message.payload.rstrip()[:-1] + _VERIFIED_TAIL % (
        candidate.reading_hash.hex().encode(),
        candidate.verified_at_ms,
    )
    return topics.verified(candidate.reading.meter_id), body
