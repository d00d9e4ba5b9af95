"""Consent's typed values. Pure: no I/O.

A consent (a "grant") lets one integrator see one meter's data, or the data of every meter
currently linked to one wallet, for some scopes, for readings in a period, until it
expires or is revoked. A consent that rests on a wallet's ownership covers a meter's
readings only from the times that wallet owned it. Times are unix milliseconds, as in
readings.
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
    granted_by: str | None = None  #: the owner's account that granted it; None: the operator
    #: Bound to one meter: the periods [from, to) its owner held it (the account of a
    #: wallet-wide consent, or the granter of a meter consent); None: not bounded.
    owned: tuple[tuple[int, int | None], ...] | None = None

    def covers_time(self, ts_ms: int) -> bool:
        if ts_ms < self.from_ms or (self.to_ms is not None and ts_ms >= self.to_ms):
            return False
        if self.owned is None:
            return True
        for lo, hi in self.owned:  # noqa: SIM110 - no generator object per live reading
            if lo <= ts_ms and (hi is None or ts_ms < hi):
                return True
        return False

    @property
    def owner(self) -> str | None:
        """The account whose ownership of a meter bounds this consent: a wallet's consent
        for all its meters rests on it whoever granted it; the operator's consent for one
        meter rests on its recorded reason, not on an owner."""
        return self.account if self.meter_id is None else self.granted_by

    def expired(self, now_ms: int) -> bool:
        return self.expires_ms is not None and self.expires_ms <= now_ms


@dataclass(frozen=True, slots=True)
class Link:
    """A row of wallet_links: `account` owned the meter over [from_ms, to_ms)."""

    meter_id: str
    account: str
    from_ms: int
    to_ms: int | None  #: exclusive; None: the current link


@dataclass(frozen=True, slots=True)
class Decision:
    consent: UUID | None = None  #: the consent that allowed it
    refusal: Refusal | None = None

    @property
    def allowed(self) -> bool:
        return self.refusal is None
