"""Integrators and consents in PostgreSQL: every change checked, recorded and notified.

A change runs in one transaction that also appends its audit event (consent_events); the
tables' triggers NOTIFY `meterproof_consents` after commit, so every `ConsentView` cache
reloads within a second. A refused change rolls back, then appends a `refused` event with
its reason code, logs a line and counts `meterproof_access_refusals_total`: the state is
as it was, and the attempt is on record.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, LiteralString, NoReturn
from uuid import UUID

import psycopg
import structlog
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from meterproof.consent.model import Grant, Link, Scope
from meterproof.consent.policy import ConsentView
from meterproof.registry import documents
from meterproof.registry.accounts import AccountId, BadSignatureError
from meterproof.registry.errors import RefusedError
from meterproof.registry.telemetry import CHANGES, REFUSALS
from meterproof.registry.wallets import Challenge, issue_challenge, take_challenge

Conn = psycopg.Connection[Any]
log = structlog.get_logger("consent")

#: The NOTIFY channel of db/migrations/0004_consent.sql.
CHANNEL: Final = "meterproof_consents"
OPERATOR: Final = "operator"
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Integrator:
    name: str
    status: str
    cert_serial: str
    created_at: datetime
    revoked_at: datetime | None
    revoked_reason: str | None


@dataclass(frozen=True, slots=True)
class GrantRequest:
    """What a grant says; the same fields make the document an owner signs."""

    integrator: str
    meter_id: str | None
    account: AccountId | None
    scopes: frozenset[Scope]
    data_from: datetime
    data_to: datetime | None
    expires_at: datetime | None

    def fields(self, signer: AccountId) -> list[tuple[str, str]]:
        target = (
            ("meter", self.meter_id) if self.meter_id else ("every_meter_of", str(self.account))
        )
        return [
            ("integrator", self.integrator),
            target,
            ("scopes", ",".join(sorted(self.scopes))),
            ("from", documents.timestamp(self.data_from)),
            ("to", documents.timestamp(self.data_to)),
            ("expires", documents.timestamp(self.expires_at)),
            ("signer", str(signer)),
        ]


@dataclass(frozen=True, slots=True)
class Consent:
    id: UUID
    integrator: str
    meter_id: str | None
    account: str | None
    scopes: tuple[str, ...]
    data_from: datetime
    data_to: datetime | None
    expires_at: datetime | None
    granted_by: str
    granted_at: datetime
    status: str
    events: list[dict[str, Any]] = field(default_factory=list)


# -- integrators ------------------------------------------------------------------------


def add_integrator(conn: Conn, name: str, *, cert_serial: str) -> str:
    """Record the integrator; return its API client secret (shown once, stored hashed)."""
    secret = secrets.token_urlsafe(32)
    try:
        with conn.transaction():
            conn.execute(
                "INSERT INTO integrators (name, cert_serial, secret_sha256) VALUES (%s, %s, %s)",
                (name, cert_serial, secret_digest(secret)),
            )
            _security_event(conn, "integrator_added", {"integrator": name})
    except psycopg.errors.UniqueViolation:
        refuse(conn, "add_integrator", RefusedError("integrator_exists", f"{name} exists"))
    CHANGES.labels(action="add_integrator").inc()
    log.info("integrator_added", integrator=name, cert_serial=cert_serial)
    return secret


def secret_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def revoke_integrator(conn: Conn, name: str, *, reason: str) -> Integrator:
    """Mark it revoked: every consent of it stops counting at once (the policy refuses a
    revoked integrator); the certificate is the caller's to revoke."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE integrators SET status = 'revoked', revoked_at = now(), revoked_reason = %s"
            " WHERE name = %s AND status = 'active' RETURNING name",
            (reason, name),
        ).fetchone()
        if row is not None:
            _security_event(conn, "integrator_revoked", {"integrator": name, "reason": reason})
    found = fetch_integrator(conn, name)
    if found is None:
        refuse(conn, "revoke_integrator", RefusedError("unknown_integrator", f"no {name!r}"))
    if row is not None:
        CHANGES.labels(action="revoke_integrator").inc()
        log.info("integrator_revoked", integrator=name, reason=reason)
    return found


def fetch_integrator(conn: Conn, name: str) -> Integrator | None:
    found = list_integrators(conn, name=name)
    return found[0] if found else None


def list_integrators(conn: Conn, *, name: str | None = None) -> list[Integrator]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT name, status, cert_serial, created_at, revoked_at, revoked_reason"
            " FROM integrators WHERE %(name)s::text IS NULL OR name = %(name)s ORDER BY name",
            {"name": name},
        ).fetchall()
    return [Integrator(**row) for row in rows]


# -- consents ---------------------------------------------------------------------------


def request_grant(conn: Conn, request: GrantRequest, signer: AccountId) -> Challenge:
    """The document `signer` must sign for this grant; checked as far as it can be now."""
    try:
        with conn.transaction(), conn.cursor() as cur:
            _check_request(cur, request, signer)
    except RefusedError as refusal:
        refuse(conn, "grant", refusal, detail=_describe(request))
    return issue_challenge(
        conn,
        purpose=documents.CONSENT,
        account=signer,
        meter_id=request.meter_id,
        fields=request.fields(signer),
    )


def grant(
    conn: Conn,
    request: GrantRequest,
    *,
    signer: AccountId | None = None,
    challenge_id: UUID | None = None,
    signature: str | None = None,
    operator_reason: str | None = None,
) -> Consent:
    """Grant as the owner (`signer`, `challenge_id`, `signature`) or as an operator
    (`operator_reason`); refuse anything that does not check out."""
    try:
        with conn.transaction(), conn.cursor() as cur:
            if signer is not None and challenge_id is not None and signature is not None:
                _check_request(cur, request, signer)
                challenge = take_challenge(
                    cur, challenge_id, purpose=documents.CONSENT, account=signer,
                    meter_id=request.meter_id,
                )  # fmt: skip
                expected = request.fields(signer)
                signed = list(documents.parse(challenge.document)[1].items())
                if signed[: len(expected)] != expected:
                    raise RefusedError("document_mismatch", "the grant differs from the document")
                _verify(signer, challenge.document, signature)
                granted_by = str(signer)
            elif operator_reason is not None and signer is None and signature is None:
                _check_request(cur, request, None)
                granted_by = OPERATOR
            else:
                raise RefusedError("no_authority", "give a wallet signature or an operator reason")
            _check_overlap(cur, request)
            row = cur.execute(
                "INSERT INTO consents (integrator, meter_id, account_id, scopes, data_from,"
                " data_to, expires_at, granted_by, operator_reason, challenge, signature)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (
                    request.integrator, request.meter_id,
                    None if request.account is None else str(request.account),
                    sorted(request.scopes), request.data_from, request.data_to,
                    request.expires_at, granted_by, operator_reason,
                    challenge_id if signature else None, signature and signature.strip(),
                ),
            ).fetchone()  # fmt: skip
            assert row is not None
            _event(cur, row[0], "granted", actor=granted_by, reason="granted",
                   detail={"reason": operator_reason} if operator_reason else {})  # fmt: skip
    except RefusedError as refusal:
        refuse(conn, "grant", refusal, detail=_describe(request))
    CHANGES.labels(action="grant").inc()
    log.info("consent_granted", consent=str(row[0]), by=granted_by, **_describe(request))
    found = show(conn, row[0])
    assert found is not None
    return found


def request_revoke(conn: Conn, consent_id: UUID, signer: AccountId) -> Challenge:
    """The document `signer` must sign to revoke the consent."""
    with conn.cursor() as cur:
        try:
            _revocable(cur, consent_id, signer)
        except RefusedError as refusal:
            refuse(conn, "revoke", refusal, detail={"consent": str(consent_id)})
    return issue_challenge(
        conn,
        purpose=documents.CONSENT_REVOKE,
        account=signer,
        meter_id=None,
        fields=[("consent", str(consent_id)), ("signer", str(signer))],
    )


def revoke(
    conn: Conn,
    consent_id: UUID,
    *,
    signer: AccountId | None = None,
    challenge_id: UUID | None = None,
    signature: str | None = None,
    operator_reason: str | None = None,
) -> Consent:
    """End the consent now, as its owner or as an operator with a reason."""
    try:
        with conn.transaction(), conn.cursor() as cur:
            if signer is not None and challenge_id is not None and signature is not None:
                _revocable(cur, consent_id, signer)
                challenge = take_challenge(
                    cur, challenge_id, purpose=documents.CONSENT_REVOKE, account=signer,
                    meter_id=None,
                )  # fmt: skip
                if documents.parse(challenge.document)[1].get("consent") != str(consent_id):
                    raise RefusedError("document_mismatch", "the document names another consent")
                _verify(signer, challenge.document, signature)
                actor, detail = str(signer), {}
            elif operator_reason is not None and signer is None and signature is None:
                _revocable(cur, consent_id, None)
                actor, detail = OPERATOR, {"reason": operator_reason}
            else:
                raise RefusedError("no_authority", "give a wallet signature or an operator reason")
            _event(cur, consent_id, "revoked", actor=actor, reason="revoked", detail=detail)
    except RefusedError as refusal:
        refuse(conn, "revoke", refusal, detail={"consent": str(consent_id)})
    CHANGES.labels(action="revoke").inc()
    log.info("consent_revoked", consent=str(consent_id), by=actor)
    found = show(conn, consent_id)
    assert found is not None
    return found


def record_expiries(conn: Conn) -> int:
    """Append an `expired` event to each consent whose expiry has passed (idempotent: any
    number of processes may run it). The policy refuses them already; this is the audit.

    Nothing is inserted (and so nothing NOTIFYs every view to reload) unless one is due:
    the workers run this every few seconds."""
    due = conn.execute(
        "SELECT EXISTS (SELECT FROM consent_state WHERE status = 'expired' AND ended IS NULL)"
    ).fetchone()
    if due is None or not due[0]:
        return 0
    with conn.transaction():
        cur = conn.execute(
            "INSERT INTO consent_events (consent, event, actor, reason)"
            " SELECT id, 'expired', 'system', 'expired' FROM consent_state"
            " WHERE status = 'expired' AND ended IS NULL"
            " ON CONFLICT (consent) WHERE event IN ('revoked', 'expired') DO NOTHING"
        )
    if cur.rowcount > 0:
        CHANGES.labels(action="expire").inc(cur.rowcount)
        log.info("consents_expired", count=cur.rowcount)
    return cur.rowcount


def list_consents(
    conn: Conn, *, integrator: str | None = None, meter_id: str | None = None
) -> list[Consent]:
    """Consents of an integrator and/or covering a meter (directly or through its current
    wallet), newest first."""
    return _select(
        conn,
        "(%(integrator)s::text IS NULL OR c.integrator = %(integrator)s)"
        " AND (%(meter)s::text IS NULL OR c.meter_id = %(meter)s OR c.account_id ="
        " (SELECT account_id FROM wallet_links WHERE meter_id = %(meter)s"
        "  AND unlinked_at IS NULL))",
        {"integrator": integrator, "meter": meter_id},
    )


def show(conn: Conn, consent_id: UUID) -> Consent | None:
    """The consent with its full audit trail."""
    found = _select(conn, "c.id = %(id)s", {"id": consent_id})
    if not found:
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        events = cur.execute(
            "SELECT event, actor, reason, detail, at FROM consent_events WHERE consent = %s"
            " ORDER BY id",
            (consent_id,),
        ).fetchall()
    found[0].events.extend(events)
    return found[0]


def load_view(conn: Conn) -> ConsentView:
    """The policy's snapshot: integrators, consents not ended, and every link, past and
    current, of the accounts those consents rest on (a wallet-wide consent's account, an
    owner's meter consent's granter)."""
    integrators = {r[0]: r[1] == "active" for r in conn.execute(
        "SELECT name, status FROM integrators").fetchall()}  # fmt: skip
    grants = [
        Grant(
            id=r[0],
            integrator=r[1],
            meter_id=r[2],
            account=r[3],
            scopes=frozenset(Scope(s) for s in r[4]),
            from_ms=_ms(r[5]),
            to_ms=None if r[6] is None else _ms(r[6]),
            expires_ms=None if r[7] is None else _ms(r[7]),
            granted_by=None if r[8] == OPERATOR else r[8],
        )
        for r in conn.execute(
            "SELECT id, integrator, meter_id, account_id, scopes, data_from, data_to,"
            " expires_at, granted_by FROM consent_state WHERE ended IS NULL"
        ).fetchall()
    ]
    links = [
        Link(r[0], r[1], _ms_ceil(r[2]), None if r[3] is None else _ms_ceil(r[3]))
        for r in conn.execute(
            "SELECT meter_id, account_id, linked_at, unlinked_at FROM wallet_links"
            " WHERE account_id IN (SELECT coalesce(account_id, nullif(granted_by, %s))"
            " FROM consent_state WHERE ended IS NULL)",
            (OPERATOR,),
        ).fetchall()
    ]
    return ConsentView(integrators=integrators, grants=grants, links=links)


def refuse(
    conn: Conn, action: str, refusal: RefusedError, *, detail: dict[str, Any] | None = None
) -> NoReturn:
    """Record the refusal (event, log line, metric) after the rollback, then raise it."""
    with conn.transaction():
        _event(conn, None, "refused", actor=OPERATOR, reason=refusal.code,
               detail={"action": action, "detail": str(refusal), **(detail or {})})  # fmt: skip
    REFUSALS.labels(action=action, reason=refusal.code).inc()
    log.warning(f"{action}_refused", reason=refusal.code, detail=str(refusal), **(detail or {}))
    raise refusal


# -- checks -----------------------------------------------------------------------------


def _check_request(
    cur: psycopg.Cursor[Any], request: GrantRequest, signer: AccountId | None
) -> None:
    """Everything a grant needs but the signature: a live integrator, a known target the
    signer owns, a sane period. Locks the integrator row, so grants to it queue."""
    row = cur.execute(
        "SELECT status FROM integrators WHERE name = %s FOR UPDATE", (request.integrator,)
    ).fetchone()
    if row is None:
        raise RefusedError("unknown_integrator", f"no integrator {request.integrator!r}")
    if row[0] != "active":
        raise RefusedError("integrator_revoked", f"{request.integrator} is revoked")
    now = datetime.now(UTC)
    if request.data_to is not None and request.data_to <= request.data_from:
        raise RefusedError("invalid_period", "--to must be after --from")
    if request.expires_at is not None and request.expires_at <= now:
        raise RefusedError("invalid_period", "--expires must be in the future")
    if request.meter_id is not None:
        found = cur.execute(
            "SELECT m.status::text, l.account_id FROM meters m LEFT JOIN wallet_links l"
            " ON l.meter_id = m.meter_id AND l.unlinked_at IS NULL WHERE m.meter_id = %s",
            (request.meter_id,),
        ).fetchone()
        if found is None:
            raise RefusedError("unknown_meter", f"no meter {request.meter_id!r}")
        if signer is not None and found[1] != str(signer):
            raise RefusedError("not_owner", f"{signer} is not the wallet linked to the meter")
    elif signer is not None and request.account != signer:
        raise RefusedError("not_owner", "only the wallet itself grants for all its meters")


def _check_overlap(cur: psycopg.Cursor[Any], request: GrantRequest) -> None:
    """Two active consents of one integrator for one target must not cover the same scope
    and time: revoking one would leave the other, so the owner could not tell what holds."""
    row = cur.execute(
        "SELECT id FROM consent_state WHERE status = 'active' AND integrator = %s"
        " AND meter_id IS NOT DISTINCT FROM %s AND account_id IS NOT DISTINCT FROM %s"
        " AND scopes && %s::text[]"
        " AND tstzrange(data_from, data_to) && tstzrange(%s, %s) LIMIT 1",
        (
            request.integrator, request.meter_id,
            None if request.account is None else str(request.account),
            sorted(request.scopes), request.data_from, request.data_to,
        ),
    ).fetchone()  # fmt: skip
    if row is not None:
        raise RefusedError("overlapping_consent", f"consent {row[0]} covers part of it already")


def _revocable(cur: psycopg.Cursor[Any], consent_id: UUID, signer: AccountId | None) -> None:
    row = cur.execute(
        "SELECT c.status, c.account_id, l.account_id FROM consent_state c"
        " LEFT JOIN wallet_links l ON l.meter_id = c.meter_id AND l.unlinked_at IS NULL"
        " WHERE c.id = %s",
        (consent_id,),
    ).fetchone()
    if row is None:
        raise RefusedError("unknown_consent", f"no consent {consent_id}")
    if row[0] != "active":
        raise RefusedError("already_ended", f"consent {consent_id} is {row[0]}")
    if signer is not None and str(signer) not in (row[1], row[2]):
        raise RefusedError("not_owner", f"{signer} does not own what consent {consent_id} covers")


def _verify(signer: AccountId, document: str, signature: str) -> None:
    try:
        signer.verify(document, signature)
    except BadSignatureError as exc:
        raise RefusedError("bad_signature", str(exc)) from exc


def _event(
    cur: psycopg.Cursor[Any] | Conn,
    consent: UUID | None,
    event: str,
    *,
    actor: str,
    reason: str,
    detail: dict[str, Any],
) -> None:
    cur.execute(
        "INSERT INTO consent_events (consent, event, actor, reason, detail)"
        " VALUES (%s, %s, %s, %s, %s)",
        (consent, event, actor, reason, Jsonb(detail)),
    )


def _security_event(conn: Conn, event_type: str, detail: dict[str, Any]) -> None:
    conn.execute(
        "INSERT INTO security_events (type, severity, detail) VALUES (%s, 'info', %s)",
        (event_type, Jsonb(detail)),
    )


def _select(conn: Conn, where: LiteralString, params: dict[str, Any]) -> list[Consent]:
    query = sql.SQL(
        "SELECT c.id, c.integrator, c.meter_id, c.account_id AS account, c.scopes,"
        " c.data_from, c.data_to, c.expires_at, c.granted_by, c.granted_at, c.status"
        " FROM consent_state c WHERE {} ORDER BY c.granted_at DESC, c.id"
    ).format(sql.SQL(where))
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query, params).fetchall()
    return [Consent(**{**row, "scopes": tuple(row["scopes"])}) for row in rows]


def _describe(request: GrantRequest) -> dict[str, Any]:
    return {
        "integrator": request.integrator,
        "meter_id": request.meter_id,
        "account": None if request.account is None else str(request.account),
        "scopes": sorted(request.scopes),
    }


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _ms_ceil(at: datetime) -> int:
    """The first whole millisecond at or after `at`, exactly: a link's bound, so a reading
    (whole milliseconds) a microsecond before the link began or ended falls before it."""
    return -(-(at - _EPOCH) // timedelta(microseconds=1) // 1000)
