"""What a rejection means for security: its event type and severity, and when repeated
failures quarantine a meter. Pure; the store writes what this decides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from meterproof.ingest.records import Rejection
from meterproof.schemas.reading import RejectReason

#: reason -> (security event type, severity). The reason code stays the only label.
EVENTS: Final[dict[RejectReason, tuple[str, str]]] = {
    RejectReason.MALFORMED: ("malformed_payload", "low"),
    RejectReason.TOPIC_MISMATCH: ("topic_mismatch", "high"),
    RejectReason.UNKNOWN_METER: ("unknown_meter", "medium"),
    RejectReason.METER_NOT_ACTIVE: ("inactive_meter_reading", "low"),
    RejectReason.UNSUPPORTED_ALG: ("unsupported_alg", "medium"),
    RejectReason.BAD_SIGNATURE: ("bad_signature", "high"),
    RejectReason.TIMESTAMP_SKEW: ("timestamp_skew", "medium"),
    RejectReason.STALE_READING: ("stale_reading", "low"),
    RejectReason.SEQ_REUSED: ("seq_reused", "critical"),
    RejectReason.REGISTER_DECREASED: ("register_decreased", "high"),
    RejectReason.RATE_LIMITED: ("rate_limited", "medium"),
    RejectReason.STORE_REFUSED: ("store_refused", "high"),
}


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    type: str
    severity: str
    detail: dict[str, object]


def event_for(rejection: Rejection) -> SecurityEvent:
    kind, severity = EVENTS[rejection.reason]
    detail: dict[str, object] = {"reason": rejection.reason.value, "detail": rejection.detail}
    if rejection.seq is not None:
        detail["seq"] = rejection.seq
    if rejection.reading_hash is not None:
        detail["reading_hash"] = rejection.reading_hash.hex()
    return SecurityEvent(kind, severity, detail)


@dataclass(frozen=True, slots=True)
class QuarantinePolicy:
    """`failures` security failures within `window_s` quarantine a meter until an operator
    re-activates it. Malformed or stale readings do not count: a buggy clock or firmware is
    not an attack, and it is visible in the rejected readings anyway."""

    failures: int = 5
    window_s: int = 600
    reasons: frozenset[RejectReason] = field(
        default_factory=lambda: frozenset(
            {
                RejectReason.TOPIC_MISMATCH,
                RejectReason.UNSUPPORTED_ALG,
                RejectReason.BAD_SIGNATURE,
                RejectReason.SEQ_REUSED,
                RejectReason.REGISTER_DECREASED,
                RejectReason.RATE_LIMITED,
            }
        )
    )

    def __post_init__(self) -> None:
        if self.failures < 1 or self.window_s <= 0:
            raise ValueError("quarantine needs failures >= 1 and window_s > 0")

    def counts(self, reason: RejectReason) -> bool:
        return reason in self.reasons

    def event_types(self) -> set[str]:
        return {EVENTS[r][0] for r in self.reasons}
