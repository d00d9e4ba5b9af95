"""The drain with the consent policy in place: 1,000 integrators and 10,000 consents.

The consents cover 10,000 other registered meters, so the drained fleet's readings pay
for the policy (the view's load and one lookup per reading) and not for deliveries; a
third run adds one live consent per drained meter, which costs one more publish per
reading: the price of a delivery, reported apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import psycopg

from meterproof.bench.compare import SERVER

LIVE_RATE: Final = 1_000  #: readings/s offered by connected meters in the live runs
LIVE_METERS: Final = 200
INTEGRATORS: Final = 1_000
CONSENTS: Final = 10_000
_FROM: Final = datetime(2026, 1, 1, tzinfo=UTC)


def seed(database_url: str, *, integrators: int = INTEGRATORS, consents: int = CONSENTS) -> None:
    """Integrators and operator-granted consents over meters of their own (COPY)."""
    names = [f"bench-integrator-{i:04d}" for i in range(integrators)]
    meters = [f"bench-consented-{i:05d}" for i in range(consents)]
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        with conn.cursor().copy("COPY meters (meter_id, status) FROM STDIN") as copy:
            for meter_id in meters:
                copy.write_row((meter_id, "active"))
        with conn.cursor().copy(
            "COPY integrators (name, cert_serial, secret_sha256) FROM STDIN"
        ) as copy:
            for name in names:
                copy.write_row((name, "1f", hashlib.sha256(name.encode()).digest()))
        add_consents(conn, [(names[i % integrators], m) for i, m in enumerate(meters)])


def consent_fleet(database_url: str, meter_ids: list[str]) -> None:
    """One live consent per meter of `meter_ids`, to the first bench integrator."""
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        add_consents(conn, [("bench-integrator-0000", m) for m in meter_ids])


def add_consents(conn: psycopg.Connection[object], pairs: list[tuple[str, str]]) -> None:
    with conn.cursor().copy(
        "COPY consents (integrator, meter_id, scopes, data_from, granted_by, operator_reason)"
        " FROM STDIN"
    ) as copy:
        for integrator, meter_id in pairs:
            copy.write_row(
                (integrator, meter_id, ["live", "history"], _FROM, "operator", "benchmark")
            )


def policy_in_place(database_url: str, _fleet: list[str]) -> None:
    seed(database_url)


def delivering(database_url: str, fleet: list[str]) -> None:
    seed(database_url)
    consent_fleet(database_url, fleet)


#: The three drains, by name: what each puts in place before the workers start.
CASES: Final[dict[str, Callable[[str, list[str]], None] | None]] = {
    "none": None,
    "policy": policy_in_place,
    "delivering": delivering,
}


def live_figures(tier: dict[str, Any]) -> dict[str, float]:
    """Accepted rate, server CPU per accepted reading and p99 publish->receipt of a tier."""
    cores = tier["cpu"]["cores"]
    accepted = max(float(tier["accepted_per_s"]), 1.0)
    return {
        "accepted_per_s": accepted,
        "server_us": round(sum(cores.get(g, 0.0) for g in SERVER) * 1e6 / accepted, 1),
        "workers_us": round(cores.get("workers", 0.0) * 1e6 / accepted, 1),
        "p99_ms": float(tier["latency_ms"]["p99"] or 0.0),
    }
