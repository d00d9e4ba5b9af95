"""The typed values that flow through the pipeline, one per stage boundary.

Message (from the broker) -> Candidate (parsed, signature checked) -> Outcome (after the
durable checks). A rejection can happen at any stage and always carries a spec reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from meterproof.schemas.reading import ReceiptStatus, RejectReason, SignedReading


@dataclass(frozen=True, slots=True)
class Message:
    """One PUBLISH as received; it stays unacknowledged until its outcome is committed."""

    topic: str
    payload: bytes
    received_at_ms: int


@dataclass(frozen=True, slots=True)
class Candidate:
    """A reading whose form, key and signature are good; durable checks still to come."""

    message: Message
    reading: SignedReading
    signing_bytes: bytes
    reading_hash: bytes
    verified_at_ms: int


@dataclass(frozen=True, slots=True)
class Rejection:
    message: Message
    reason: RejectReason
    detail: str
    meter_id: str | None = None
    seq: int | None = None
    reading_hash: bytes | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    candidate: Candidate

    @property
    def message(self) -> Message:
        return self.candidate.message


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Already stored with the same hash: not an error, the meter just did not hear back."""

    candidate: Candidate

    @property
    def message(self) -> Message:
        return self.candidate.message


Outcome: TypeAlias = Accepted | Duplicate | Rejection


def receipt_fields(
    outcome: Outcome,
) -> tuple[int | None, bytes | None, ReceiptStatus, RejectReason | None]:
    """(seq, reading_hash, status, reason) for the receipt of any outcome."""
    if isinstance(outcome, Rejection):
        return outcome.seq, outcome.reading_hash, ReceiptStatus.REJECTED, outcome.reason
    status = ReceiptStatus.ACCEPTED if isinstance(outcome, Accepted) else ReceiptStatus.DUPLICATE
    c = outcome.candidate
    return c.reading.seq, c.reading_hash, status, None
