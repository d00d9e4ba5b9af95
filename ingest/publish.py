"""What the worker tells the world after a commit: the receipt to the publishing meter and
the verified reading to integrators. Pure builders; the source's client sends them."""

from __future__ import annotations

import orjson

from ingest.decode import topic_meter_id
from ingest.records import Candidate, Outcome, receipt_fields


def receipt(outcome: Outcome) -> tuple[str, bytes] | None:
    """The receipt goes to the meter that published (its topic), even for a payload that
    names another meter or cannot be parsed; None if the topic names no meter."""
    publisher = topic_meter_id(outcome.message.topic)
    if publisher is None:
        return None
    seq, digest, status, reason = receipt_fields(outcome)
    body = {
        "seq": seq,
        "reading_hash": None if digest is None else digest.hex(),
        "status": status.value,
        "reason": None if reason is None else reason.value,
    }
    return f"meters/{publisher}/receipts", orjson.dumps(body)


def verified(candidate: Candidate) -> tuple[str, bytes]:
    """The signed fields as received, plus `reading_hash` and `verified_at` (reading-v1 s7)."""
    body = candidate.reading.wire_dict()
    body["reading_hash"] = candidate.reading_hash.hex()
    body["verified_at"] = candidate.verified_at_ms
    return f"verified/{candidate.reading.meter_id}/readings", orjson.dumps(body)
