"""Who may see and change what: refusals and changes by action and stable reason code,
and the audit and log lines of a refusal."""

from __future__ import annotations

from typing import Any, Final

import psycopg
import structlog
from prometheus_client import Counter
from psycopg.types.json import Jsonb

from meterproof.registry.errors import RefusedError, StateError

log = structlog.get_logger("registry")

REFUSALS: Final = Counter(
    "meterproof_access_refusals",
    "Refused wallet links, consent grants and revocations, integrator changes, meter changes",
    ["action", "reason"],
)
CHANGES: Final = Counter(
    "meterproof_access_changes",
    "Recorded links and unlinks, consent grants, revocations, expiries, integrator changes",
    ["action"],
)


def record_refusal(
    conn: psycopg.Connection[Any],
    action: str,
    refusal: RefusedError | StateError,
    *,
    meter_id: str | None,
    account: str | None,
) -> None:
    """The audit line (security event `<action>_refused`), log line and metric of a
    refused change, after its rollback."""
    with conn.transaction():
        conn.execute(
            "INSERT INTO security_events (type, severity, meter_id, detail)"
            " VALUES (%s, 'medium', %s, %s)",
            (
                f"{action}_refused",
                meter_id,
                Jsonb({"reason": refusal.code, "account": account, "detail": str(refusal)}),
            ),
        )
    REFUSALS.labels(action=action, reason=refusal.code).inc()
    log.warning(
        f"{action}_refused",
        reason=refusal.code,
        meter_id=meter_id,
        account=account,
        detail=str(refusal),
    )
