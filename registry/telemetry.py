"""Metrics of who may see what: refusals and changes, by action and stable reason code."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter

REFUSALS: Final = Counter(
    "meterproof_access_refusals",
    "Refused wallet links, consent grants and revocations, integrator changes",
    ["action", "reason"],
)
CHANGES: Final = Counter(
    "meterproof_access_changes",
    "Recorded links and unlinks, consent grants, revocations, expiries, integrator changes",
    ["action"],
)
