"""The kit's ingest side: the product's own decode, verify and judge stages over an
in-memory registry (the one meter, active, with its one key) and an in-memory store, so
a receipt from the kit is the receipt a real worker would send for the same reading.

Pure and stateful: `answer()` takes one received message and returns the receipt to send.
"""

from __future__ import annotations

from collections import defaultdict

from meterproof.ingest.decode import decode
from meterproof.ingest.judge import RateLimit, StoredPoint, context_of, judge
from meterproof.ingest.publish import receipt
from meterproof.ingest.records import Accepted, Message, Outcome, Rejection, receipt_fields
from meterproof.ingest.verify import TimeBounds, verify
from meterproof.registry.model import MeterStatus, default_kid
from meterproof.registry.snapshots import MeterSnapshot, RegisteredKey
from meterproof.schemas.signatures import PublicKey


class Answerer:
    def __init__(self, meter_id: str, key: PublicKey) -> None:
        self._meter = MeterSnapshot(
            meter_id,
            MeterStatus.ACTIVE.value,
            (RegisteredKey(default_kid(key.pem()), key, valid_from_ms=0, valid_to_ms=None),),
        )
        self._bounds = TimeBounds()
        self._limit = RateLimit()
        self._seen: dict[tuple[str, int], bytes] = {}
        self._history: dict[str, list[StoredPoint]] = defaultdict(list)

    def outcome(self, topic: str, payload: bytes, now_ms: int) -> Outcome:
        message = Message(topic, payload, now_ms)
        decoded = decode(message)
        if isinstance(decoded, Rejection):
            return decoded
        meter = self._meter if decoded.reading.meter_id == self._meter.meter_id else None
        candidate = verify(decoded, meter, now_ms=now_ms, bounds=self._bounds)
        if isinstance(candidate, Rejection):
            return candidate
        contexts = context_of(
            [candidate], seen=self._seen, history=self._history, limit=self._limit
        )
        (result,) = judge([candidate], contexts, limit=self._limit)
        if isinstance(result, Accepted):
            r = candidate.reading
            self._seen[(r.meter_id, r.seq)] = candidate.reading_hash
            self._history[r.meter_id].append(StoredPoint(r.ts, r.import_wh, r.export_wh))
        return result

    def answer(
        self, topic: str, payload: bytes, now_ms: int
    ) -> tuple[tuple[str, bytes] | None, Outcome]:
        """The receipt (topic, body) for one message, None if its topic names no meter."""
        outcome = self.outcome(topic, payload, now_ms)
        return receipt(outcome), outcome


def describe(outcome: Outcome) -> tuple[int | None, str | None, str]:
    """(seq, reading_hash hex, status or reason) of an outcome, as the report shows it."""
    seq, digest, status, reason = receipt_fields(outcome)
    return seq, None if digest is None else digest.hex(), reason.value if reason else status.value
