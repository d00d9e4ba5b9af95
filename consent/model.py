"""Consent's typed values. Pure: no I/O.

A consent (a "grant") lets one integrator see one meter's data, or the data of every meter
currently linked to one wallet, for some scopes, for readings in a period, until it
expires or is revoked. Times are unix milliseconds, as in readings.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from uuid import UUID


class Scope(StrEnum):
    LIVE = "live"  #: the verified stream, as readings arrive
    HISTORY = "history"  #: stored readings
    LEDGER = "ledger"  #: anchored entries, proofs and mints of the covered meters


class Refusal(StrEnum):
    """Why the policy said no: the code in a log line, a metric label and an HTTP body."""

    UNKNOWN_INTEGRATOR = "unknown_integrator"
    INTEGRATOR_REVOKED = "integrator_revoked"
    NO_CONSENT = "no_consent"  #: none active for this meter (never granted, or revoked)
    EXPIRED = "expired"
    SCOPE = "scope"
    PERIOD = "period"  #: the reading's time is outside every covering consent's period


@dataclass(frozen=True, slots=True)
class Grant:
    """An active consent as the policy sees it."""

    id: UUID
    integrator: str
    meter_id: str | None  #: one meter, or
    account: str | None  #: every meter currently linked to this account
    scopes: frozenset[Scope]
    from_ms: int
    to_ms: int | None  #: exclusive; None: open-ended
    expires_ms: int | None

    def covers_time(self, ts_ms: int) -> bool:
        return self.from_ms <= ts_ms and (self.to_ms is None or ts_ms < self.to_ms)

    def expired(self, now_ms: int) -> bool:
        return self.expires_ms is not None and self.expires_ms <= now_ms


@dataclass(frozen=True, slots=True)
class Decision:
    consent: UUID | None = None  #: the consent that allowed it
    refusal: Refusal | None = None

    @property
    def allowed(self) -> bool:
        return self.refusal is None
