"""When is a fault over: probes of the backlog a fault leaves behind.

Under a steady load there is always some reading in flight, so "backlog drained" cannot
mean "nothing pending". It means: nothing that was waiting when the fault ended still
waits. For the ingest path that is read from the meters' own outboxes (a reading leaves
its outbox only with its receipt, which the worker sends after commit); for the bridge,
from the database (every reading stored before the fault ended sits in an anchored batch).
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg


def oldest_unreceipted(state_root: Path) -> float | None:
    """The write time (epoch seconds) of the oldest reading still in any meter's outbox,
    None when every outbox is empty. Reads only directory entries, no payloads."""
    oldest: float | None = None
    try:
        meters = list(os.scandir(state_root))
    except FileNotFoundError:
        return None
    for meter in meters:
        try:
            entries = list(os.scandir(Path(meter.path) / "outbox"))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if not entry.name.endswith(".json"):
                continue
            try:
                written = entry.stat().st_mtime
            except FileNotFoundError:
                continue  # receipted while we looked
            if oldest is None or written < oldest:
                oldest = written
    return oldest


def ingest_caught_up(state_root: Path, since: float) -> bool:
    """Every reading written before `since` has its receipt."""
    oldest = oldest_unreceipted(state_root)
    return oldest is None or oldest >= since


def unanchored_before(database_url: str, since: float) -> int | None:
    """Readings stored before `since` that no anchored batch holds yet; None if the
    database does not answer (it counts as not caught up)."""
    try:
        with psycopg.connect(database_url, connect_timeout=3) as conn:
            row = conn.execute(
                "SELECT count(*) FROM reading_log l LEFT JOIN bridge_batches b"
                " ON b.batch = l.batch_id"
                " WHERE l.stored_at < to_timestamp(%s) AND b.status IS DISTINCT FROM 'anchored'",
                (since,),
            ).fetchone()
    except psycopg.OperationalError:
        return None
    return int(row[0]) if row else None


def stored_count(database_url: str) -> int | None:
    try:
        with psycopg.connect(database_url, connect_timeout=3) as conn:
            row = conn.execute("SELECT count(*) FROM reading_log").fetchone()
    except psycopg.OperationalError:
        return None
    return int(row[0]) if row else None


def meters_stored_since(database_url: str, since: float) -> int:
    """How many meters have a reading stored after `since` (0 while the database does not
    answer)."""
    try:
        with psycopg.connect(database_url, connect_timeout=3) as conn:
            row = conn.execute(
                "SELECT count(DISTINCT meter_id) FROM reading_log"
                " WHERE stored_at > to_timestamp(%s)",
                (since,),
            ).fetchone()
    except psycopg.OperationalError:
        return 0
    return 0 if row is None else int(row[0])


def stored_since(database_url: str, since: float) -> bool:
    """Some reading was stored after `since` (False while the database does not answer)."""
    try:
        with psycopg.connect(database_url, connect_timeout=3) as conn:
            row = conn.execute(
                "SELECT 1 FROM reading_log WHERE stored_at > to_timestamp(%s) LIMIT 1", (since,)
            ).fetchone()
    except psycopg.OperationalError:
        return False
    return row is not None
