"""Meter statuses: one list in Python, the same values in the database's enum, and the
statuses that accept readings defined once (`registry.model.ACCEPTING`)."""

from __future__ import annotations

import psycopg

from meterproof.ingest import store
from meterproof.registry.model import ACCEPTING, MeterStatus


def test_the_database_enum_has_exactly_the_registry_statuses(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT enum_range(NULL::meter_status)::text[]").fetchone()
    assert row is not None
    assert row[0] == [s.value for s in MeterStatus]


def test_the_store_quarantines_exactly_the_accepting_statuses() -> None:
    query = store._QUARANTINE.as_string(None)
    listed = query.partition("status IN (")[2].partition(")")[0]
    assert {MeterStatus(s.strip().strip("'")) for s in listed.split(",")} == ACCEPTING
