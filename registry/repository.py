"""The registry in PostgreSQL: meters, their signing keys, the security event log.

Every write runs in its own transaction (a savepoint if the caller has one open) and
records the security event that explains it in that same transaction, so the log never
misses a change nor shows one that did not happen. Every value travels as a parameter.
A change the meter's state forbids (a decommissioned meter) is refused with a reason code
(StateError) and, after the rollback, recorded like the registry's other refusals.
Reads take any connection; lookups of an unknown meter return None or an empty list.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Final

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from meterproof.registry.errors import (
    InvalidInputError,
    MeterExistsError,
    StateError,
    UnknownMeterError,
)
from meterproof.registry.model import (
    STATUS_SEVERITY,
    KeyRecord,
    KeyRotation,
    MeterRecord,
    MeterStatus,
    NewKey,
    NewMeter,
    SecurityEvent,
    SecurityLevel,
    Severity,
    StatusChange,
    check_label,
    quoted,
)
from meterproof.registry.telemetry import record_refusal
from meterproof.schemas.reading import Alg

Conn = psycopg.Connection[Any]

MAX_OVERLAP: Final = timedelta(days=90)
_EVENT_TYPE: Final = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_METERS: Final = """
SELECT id, meter_id, status::text AS status, security_level::text AS security_level,
       owner_wallet, serial, manufacturer, model, firmware_version, hardware_revision,
       location, capabilities, security_profile, cert_fingerprint, cert_serial,
       created_at, updated_at
FROM meters
WHERE (%(meter_id)s::text IS NULL OR meter_id = %(meter_id)s::text)
  AND (%(status)s::meter_status IS NULL OR status = %(status)s::meter_status)
  AND (%(level)s::security_level IS NULL OR security_level = %(level)s::security_level)
ORDER BY meter_id
LIMIT %(limit)s
"""
_KEYS: Final = """
SELECT m.meter_id, k.kid, k.alg, k.public_key_pem, k.valid_from, k.valid_to, k.created_at
FROM meter_keys k JOIN meters m ON m.id = k.meter
WHERE m.meter_id = %s AND (%s OR k.valid_to IS NULL OR k.valid_to > now())
ORDER BY k.valid_from DESC, k.id DESC
"""
_COPY_METERS: Final = (
    "COPY meters (id, meter_id, status, security_level, owner_wallet, serial, manufacturer,"
    " model, firmware_version, hardware_revision, location, cert_fingerprint, cert_serial)"
    " FROM STDIN"
)
_COPY_KEYS: Final = "COPY meter_keys (meter, kid, alg, public_key_pem) FROM STDIN"
_REGISTERED_EVENTS: Final = (
    "INSERT INTO security_events (type, severity, meter_id, detail)"
    " SELECT 'registered', 'info', t.meter_id,"
    "        jsonb_build_object('status', t.status, 'kid', t.kid, 'alg', t.alg)"
    " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) AS t(meter_id, status, kid, alg)"
)


def register(conn: Conn, meters: Sequence[NewMeter]) -> None:
    """Register meters with their first key, all or none.

    COPY, in one transaction: a fleet of 1,000 costs a few round trips, not 3,000.
    """
    if not meters:
        return
    repeated = [m for m, n in Counter(m.meter_id for m in meters).items() if n > 1]
    if repeated:
        raise InvalidInputError(f"meter id {quoted(repeated[0])} appears more than once")
    ids = [m.meter_id for m in meters]
    try:
        with conn.transaction(), conn.cursor() as cur:
            taken = cur.execute(
                "SELECT meter_id FROM meters WHERE meter_id = ANY(%s) ORDER BY meter_id LIMIT 1",
                (ids,),
            ).fetchone()
            if taken is not None:
                raise MeterExistsError(f"meter {quoted(str(taken[0]))} is already registered")
            rows = [(uuid.uuid4(), m) for m in meters]
            with cur.copy(_COPY_METERS) as copy:
                for row_id, m in rows:
                    copy.write_row(
                        (
                            row_id, m.meter_id, m.status.value, m.security_level.value,
                            m.owner_wallet, m.serial, m.manufacturer, m.model,
                            m.firmware_version, m.hardware_revision,
                            None if m.location is None else Jsonb(dict(m.location)),
                            m.cert_fingerprint, m.cert_serial,
                        )
                    )  # fmt: skip
            with cur.copy(_COPY_KEYS) as copy:
                for row_id, m in rows:
                    copy.write_row((row_id, m.key.kid, m.key.alg.value, m.key.public_key_pem))
            cur.execute(
                _REGISTERED_EVENTS,
                (
                    ids,
                    [m.status.value for m in meters],
                    [m.key.kid for m in meters],
                    [m.key.alg.value for m in meters],
                ),
            )
    except psycopg.errors.UniqueViolation as exc:
        detail = exc.diag.message_detail or "a meter id is taken"
        raise MeterExistsError(f"registered concurrently: {detail}") from None


def fetch_meter(conn: Conn, meter_id: str) -> MeterRecord | None:
    found = _select_meters(conn, meter_id=meter_id, limit=1)
    return found[0] if found else None


def list_meters(
    conn: Conn,
    *,
    status: MeterStatus | None = None,
    security_level: SecurityLevel | None = None,
    limit: int = 100,
) -> list[MeterRecord]:
    """By meter id; `None` filters match everything."""
    if limit < 1:
        raise InvalidInputError(f"limit must be at least 1, not {limit}")
    return _select_meters(conn, status=status, security_level=security_level, limit=limit)


def _select_meters(
    conn: Conn,
    *,
    meter_id: str | None = None,
    status: MeterStatus | None = None,
    security_level: SecurityLevel | None = None,
    limit: int,
) -> list[MeterRecord]:
    params = {
        "meter_id": meter_id,
        "status": None if status is None else status.value,
        "level": None if security_level is None else security_level.value,
        "limit": limit,
    }
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(_METERS, params).fetchall()
    return [
        MeterRecord(
            **{
                **row,
                "status": MeterStatus(row["status"]),
                "security_level": SecurityLevel(row["security_level"]),
            }
        )
        for row in rows
    ]


def active_keys(conn: Conn, meter_id: str) -> list[KeyRecord]:
    """The meter's keys that have not expired, newest first, whatever the meter's status.

    A key retiring after a rotation is included with its `valid_to`, so a cache holding
    this list can apply the bounds itself (`KeyRecord.valid_at`) without re-fetching.
    """
    return _keys(conn, meter_id, include_expired=False)


def all_keys(conn: Conn, meter_id: str) -> list[KeyRecord]:
    """Expired keys too, newest first: the history an operator reads."""
    return _keys(conn, meter_id, include_expired=True)


def _keys(conn: Conn, meter_id: str, *, include_expired: bool) -> list[KeyRecord]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(_KEYS, (meter_id, include_expired)).fetchall()
    return [KeyRecord(**{**row, "alg": Alg(row["alg"])}) for row in rows]


def set_status(
    conn: Conn,
    meter_id: str,
    status: MeterStatus,
    *,
    reason: str | None = None,
    event_type: str = "status_changed",
    only_from: MeterStatus | None = None,
) -> StatusChange:
    """Change the status and log it (severity from `STATUS_SEVERITY`); a no-op, without an
    event, if the meter has that status already. Decommissioned is final: changing it is
    refused `meter_decommissioned` (StateError, recorded). With `only_from`, only a meter
    in that status changes, decided under the row's lock: from any other, nothing is
    written and the change returned is (its status -> the same), so a status set
    meanwhile (a quarantine) is never overwritten by a decision taken on an older read."""
    if reason is not None:
        check_label("reason", reason)
    _check_event_type(event_type)
    try:
        return _set_status(
            conn, meter_id, status, reason=reason, event_type=event_type, only_from=only_from
        )
    except StateError as refusal:
        record_refusal(conn, "set_status", refusal, meter_id=meter_id, account=None)
        raise


def _set_status(
    conn: Conn,
    meter_id: str,
    status: MeterStatus,
    *,
    reason: str | None,
    event_type: str,
    only_from: MeterStatus | None,
) -> StatusChange:
    with conn.transaction(), conn.cursor() as cur:
        row = cur.execute(
            "SELECT status::text FROM meters WHERE meter_id = %s FOR UPDATE", (meter_id,)
        ).fetchone()
        if row is None:
            raise UnknownMeterError(f"no meter {quoted(meter_id)} is registered")
        current = MeterStatus(row[0])
        if only_from is not None and current is not only_from:
            return StatusChange(meter_id, current, current)
        change = StatusChange(meter_id, current, status)
        if not change.changed:
            return change
        if change.old is MeterStatus.DECOMMISSIONED:
            raise _decommissioned(meter_id)
        cur.execute(
            "UPDATE meters SET status = %s::meter_status WHERE meter_id = %s",
            (status.value, meter_id),
        )
        _insert_event(
            cur,
            event_type,
            STATUS_SEVERITY[status],
            meter_id,
            {"from": change.old.value, "to": status.value, "reason": reason},
        )
    return change


def rotate_key(conn: Conn, meter_id: str, key: NewKey, *, overlap: timedelta) -> KeyRotation:
    """Add `key`, valid from now, and let every unexpired older key run out after `overlap`,
    so readings signed by either verify meanwhile and no reading falls into a gap."""
    if not timedelta(0) <= overlap <= MAX_OVERLAP:
        raise InvalidInputError(f"overlap must be 0 to {MAX_OVERLAP.days} days")
    try:
        return _rotate_key(conn, meter_id, key, overlap)
    except StateError as refusal:
        record_refusal(conn, "rotate_key", refusal, meter_id=meter_id, account=None)
        raise


def _rotate_key(conn: Conn, meter_id: str, key: NewKey, overlap: timedelta) -> KeyRotation:
    with conn.transaction(), conn.cursor() as cur:
        row = cur.execute(
            "SELECT id, status::text FROM meters WHERE meter_id = %s FOR UPDATE", (meter_id,)
        ).fetchone()
        if row is None:
            raise UnknownMeterError(f"no meter {quoted(meter_id)} is registered")
        meter, status = row
        if status == MeterStatus.DECOMMISSIONED:
            raise _decommissioned(meter_id)
        if cur.execute(
            "SELECT 1 FROM meter_keys WHERE meter = %s AND kid = %s", (meter, key.kid)
        ).fetchone():
            raise InvalidInputError(f"meter {quoted(meter_id)} already has a key {key.kid!r}")
        retiring = cur.execute(
            "UPDATE meter_keys SET valid_to = LEAST(valid_to, now() + %s)"
            " WHERE meter = %s AND (valid_to IS NULL OR valid_to > now())"
            " RETURNING kid",
            (overlap, meter),
        ).fetchall()
        inserted = cur.execute(
            "INSERT INTO meter_keys (meter, kid, alg, public_key_pem) VALUES (%s, %s, %s, %s)"
            " RETURNING valid_from, created_at",
            (meter, key.kid, key.alg.value, key.public_key_pem),
        ).fetchone()
        assert inserted is not None
        valid_from, created_at = inserted
        kids = tuple(sorted(str(r[0]) for r in retiring))
        _insert_event(
            cur,
            "key_rotated",
            Severity.INFO,
            meter_id,
            {
                "kid": key.kid,
                "alg": key.alg.value,
                "retiring": list(kids),
                "overlap_s": int(overlap.total_seconds()),
            },
        )
    added = KeyRecord(meter_id, key.kid, key.alg, key.public_key_pem, valid_from, None, created_at)
    return KeyRotation(added, kids)


def record_security_event(
    conn: Conn,
    *,
    event_type: str,
    severity: Severity,
    meter_id: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> int:
    """Append to the log; returns the event id. `meter_id` may be unknown or unregistered:
    failures about identities that do not exist matter most."""
    _check_event_type(event_type)
    with conn.transaction(), conn.cursor() as cur:
        return _insert_event(cur, event_type, severity, meter_id, detail or {})


def recent_events(conn: Conn, meter_id: str, *, limit: int = 10) -> list[SecurityEvent]:
    """Newest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT id, type, severity::text AS severity, meter_id, detail, at"
            " FROM security_events WHERE meter_id = %s ORDER BY at DESC, id DESC LIMIT %s",
            (meter_id, limit),
        ).fetchall()
    return [SecurityEvent(**{**row, "severity": Severity(row["severity"])}) for row in rows]


def _insert_event(
    cur: psycopg.Cursor[Any],
    event_type: str,
    severity: Severity,
    meter_id: str | None,
    detail: Mapping[str, Any],
) -> int:
    row = cur.execute(
        "INSERT INTO security_events (type, severity, meter_id, detail)"
        " VALUES (%s, %s::security_severity, %s, %s) RETURNING id",
        (event_type, severity.value, meter_id, Jsonb(dict(detail))),
    ).fetchone()
    assert row is not None
    event_id: int = row[0]
    return event_id


def _decommissioned(meter_id: str) -> StateError:
    return StateError(
        "meter_decommissioned", f"meter {quoted(meter_id)} is decommissioned; register a new id"
    )


def _check_event_type(value: str) -> None:
    if not _EVENT_TYPE.fullmatch(value):
        raise InvalidInputError(f"invalid event type {quoted(value)}: [a-z][a-z0-9_]{{0,63}}")
