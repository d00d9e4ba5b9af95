"""Wallet links: a meter's owner account, proven by the wallet and by the meter together.

Linking takes two steps. `issue_link_challenge` stores a single-use nonce and the exact
document to sign (registry/documents.py). `link_wallet` then needs (a) the wallet's
signature over that document, checked by registry/accounts.py, and (b) the meter's
confirmation: the same document signed with one of the meter's registered reading keys.
Only someone who holds the wallet *and* can make the device sign can link, so neither a
stolen wallet key nor a cloned meter id is enough. A challenge may also come from a
pairing code a P1 reader showed (registry/pairing.py): the reader has then signed the
document already, and `link_wallet` takes its signature from the pairing.

Links are history: a new link closes the current one (`unlinked_at`), never deletes it;
`meters.owner_wallet`, which the bridge credits, follows the current link by trigger
(db/migrations/0004_consent.sql). A refusal rolls back, then records a security event
(`wallet_link_refused` with its reason code) and counts a metric. The EVM zero address is
refused before any challenge is issued (`zero_wallet`): GRID can never be minted to it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from uuid import UUID

import psycopg
import structlog
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from meterproof.registry import documents
from meterproof.registry.accounts import AccountId, BadSignatureError
from meterproof.registry.errors import RefusedError
from meterproof.registry.model import (
    ACCEPTING,
    ZERO_WALLET,
    check_label,
    check_meter_id,
    is_evm_zero_account,
)
from meterproof.registry.telemetry import CHANGES, record_refusal
from meterproof.schemas.reading import b64url_decode
from meterproof.schemas.signatures import InvalidKeyError, load_public_key

Conn = psycopg.Connection[Any]
log = structlog.get_logger("registry.wallets")

CHALLENGE_TTL: Final = timedelta(minutes=10)


@dataclass(frozen=True, slots=True)
class Challenge:
    id: UUID
    purpose: str
    account: str
    meter_id: str | None
    document: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class WalletLink:
    meter_id: str
    account: str
    linked_at: datetime
    unlinked_at: datetime | None
    unlinked_by: str | None
    unlink_reason: str | None


def issue_challenge(
    conn: Conn,
    *,
    purpose: str,
    account: AccountId,
    meter_id: str | None,
    fields: list[tuple[str, str]],
    ttl: timedelta = CHALLENGE_TTL,
) -> Challenge:
    """Store a fresh challenge whose document is `fields` plus nonce, challenge id and
    expiry; the caller shows the document to whoever must sign it."""
    if purpose == documents.LINK_WALLET:
        owner_account(account)
    challenge_id = UUID(bytes=secrets.token_bytes(16), version=4)
    expires_at = datetime.now(UTC).replace(microsecond=0) + ttl
    document = documents.render(
        purpose,
        [
            *fields,
            ("challenge", str(challenge_id)),
            ("nonce", secrets.token_hex(16)),
            ("valid_until", documents.timestamp(expires_at)),
        ],
    )
    with conn.transaction():
        conn.execute(
            "INSERT INTO wallet_challenges (id, purpose, account_id, meter_id, document,"
            " expires_at) VALUES (%s, %s, %s, %s, %s, %s)",
            (challenge_id, purpose, str(account), meter_id, document, expires_at),
        )
    return Challenge(challenge_id, purpose, str(account), meter_id, document, expires_at)


def issue_link_challenge(conn: Conn, meter_id: str, account: AccountId) -> Challenge:
    """The document the wallet and the meter both sign to link `account` to `meter_id`."""
    try:
        accepting_meter(conn, check_meter_id(meter_id))
        return issue_challenge(
            conn,
            purpose=documents.LINK_WALLET,
            account=account,
            meter_id=meter_id,
            fields=[("meter", meter_id), ("wallet", str(account))],
        )
    except RefusedError as refusal:
        record_refusal(conn, "link_wallet", refusal, meter_id=meter_id, account=str(account))
        raise


def take_challenge(
    cur: psycopg.Cursor[Any],
    challenge_id: UUID,
    *,
    purpose: str,
    account: AccountId,
    meter_id: str | None,
) -> Challenge:
    """Lock the challenge and mark it used; refuse one that is unknown, for something else,
    used or expired. The caller's transaction decides whether the use sticks."""
    row = cur.execute(
        "SELECT id, purpose, account_id, meter_id, document, expires_at, used_at,"
        " expires_at <= now() AS expired FROM wallet_challenges WHERE id = %s FOR UPDATE",
        (challenge_id,),
    ).fetchone()
    if row is None:
        raise RefusedError("unknown_challenge", f"no challenge {challenge_id}")
    cid, kind, for_account, for_meter, document, expires_at, used_at, expired = row
    if kind != purpose or for_account != str(account) or for_meter != meter_id:
        raise RefusedError(
            "wrong_challenge",
            f"challenge {challenge_id} was issued for {kind} of {for_account}"
            f" and meter {for_meter or '-'}",
        )
    if used_at is not None:
        raise RefusedError("challenge_used", f"challenge {challenge_id} was used at {used_at}")
    if expired:
        raise RefusedError("challenge_expired", f"challenge {challenge_id} expired at {expires_at}")
    cur.execute("UPDATE wallet_challenges SET used_at = now() WHERE id = %s", (cid,))
    return Challenge(cid, kind, for_account, for_meter, document, expires_at)


def link_wallet(
    conn: Conn,
    *,
    meter_id: str,
    account: AccountId,
    challenge_id: UUID,
    wallet_signature: str,
    meter_kid: str | None = None,
    meter_signature: str | None = None,
) -> WalletLink:
    """Link `account` to the meter if both signatures verify over the challenge's document.

    Without `meter_kid` and `meter_signature` the meter's half comes from the pairing that
    issued the challenge (`pairing_not_signed` while the reader has not signed it)."""
    try:
        with conn.transaction(), conn.cursor() as cur:
            owner_account(account)
            accepting_meter(conn, meter_id)
            challenge = take_challenge(
                cur,
                challenge_id,
                purpose=documents.LINK_WALLET,
                account=account,
                meter_id=meter_id,
            )
            try:
                account.verify(challenge.document, wallet_signature)
            except BadSignatureError as exc:
                raise RefusedError("bad_wallet_signature", str(exc)) from exc
            if meter_kid is None or meter_signature is None:
                meter_kid, meter_signature = _paired_signature(cur, challenge.id)
            verify_meter_signature(cur, meter_id, meter_kid, challenge.document, meter_signature)
            current = cur.execute(
                "SELECT account_id FROM wallet_links WHERE meter_id = %s AND unlinked_at IS NULL",
                (meter_id,),
            ).fetchone()
            if current is not None and current[0] == str(account):
                raise RefusedError("already_linked", f"{meter_id} is linked to {account} already")
            cur.execute(
                "UPDATE wallet_links SET unlinked_at = now(), unlinked_by = %s,"
                " unlink_reason = 'relinked' WHERE meter_id = %s AND unlinked_at IS NULL",
                (str(account), meter_id),
            )
            cur.execute(
                "INSERT INTO wallet_links (meter_id, account_id, challenge, wallet_signature,"
                " meter_kid, meter_signature) VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    meter_id,
                    str(account),
                    challenge.id,
                    wallet_signature.strip(),
                    meter_kid,
                    meter_signature.strip(),
                ),
            )
            cur.execute(
                "INSERT INTO security_events (type, severity, meter_id, detail)"
                " VALUES ('wallet_linked', 'info', %s, %s)",
                (meter_id, Jsonb({"account": str(account), "previous": current and current[0]})),
            )
    except RefusedError as refusal:
        record_refusal(conn, "link_wallet", refusal, meter_id=meter_id, account=str(account))
        raise
    CHANGES.labels(action="link_wallet").inc()
    log.info("wallet_linked", meter_id=meter_id, account=str(account))
    link = current_link(conn, meter_id)
    assert link is not None, "linked in the transaction just committed"
    return link


def unlink_wallet(conn: Conn, meter_id: str, *, by: str, reason: str) -> WalletLink:
    """Close the meter's current link (an operator's act, with a reason); future mints stay
    claimable until a wallet is linked again."""
    check_label("reason", reason)
    with conn.transaction():
        row = conn.execute(
            "UPDATE wallet_links SET unlinked_at = now(), unlinked_by = %s, unlink_reason = %s"
            " WHERE meter_id = %s AND unlinked_at IS NULL RETURNING account_id",
            (by, reason, check_meter_id(meter_id)),
        ).fetchone()
        if row is None:
            refusal = RefusedError("not_linked", f"{meter_id} has no linked wallet")
        else:
            conn.execute(
                "INSERT INTO security_events (type, severity, meter_id, detail)"
                " VALUES ('wallet_unlinked', 'info', %s, %s)",
                (meter_id, Jsonb({"account": row[0], "by": by, "reason": reason})),
            )
    if row is None:
        record_refusal(conn, "unlink_wallet", refusal, meter_id=meter_id, account=None)
        raise refusal
    CHANGES.labels(action="unlink_wallet").inc()
    log.info("wallet_unlinked", meter_id=meter_id, account=row[0], by=by, reason=reason)
    history = link_history(conn, meter_id)
    return history[0]


def current_link(conn: Conn, meter_id: str) -> WalletLink | None:
    found = [h for h in link_history(conn, meter_id) if h.unlinked_at is None]
    return found[0] if found else None


def link_history(conn: Conn, meter_id: str) -> list[WalletLink]:
    """Every link of the meter, newest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT meter_id, account_id AS account, linked_at, unlinked_at, unlinked_by,"
            " unlink_reason FROM wallet_links WHERE meter_id = %s ORDER BY id DESC",
            (meter_id,),
        ).fetchall()
    return [WalletLink(**row) for row in rows]


def meters_of_wallet(conn: Conn, account: AccountId) -> list[str]:
    """The meters currently linked to `account`."""
    rows = conn.execute(
        "SELECT meter_id FROM wallet_links WHERE account_id = %s AND unlinked_at IS NULL"
        " ORDER BY meter_id",
        (str(account),),
    ).fetchall()
    return [r[0] for r in rows]


def owner_account(account: AccountId) -> None:
    """Refuse an account that can never own a meter's GRID: the EVM zero address (no one
    holds its key, and GRID refuses to mint to it). Checked when a link challenge is issued
    (a pairing code is not spent on it) and again when a link is made."""
    if is_evm_zero_account(str(account)):
        raise RefusedError(
            ZERO_WALLET, f"{account} is the EVM zero address, which cannot receive GRID"
        )


def accepting_meter(conn: Conn, meter_id: str) -> None:
    """Refuse an unknown meter or one whose status refuses readings; lock its row (inside
    a transaction) so its status cannot change under a link being made."""
    row = conn.execute(
        "SELECT status::text FROM meters WHERE meter_id = %s FOR UPDATE",
        (meter_id,),
    ).fetchone()
    if row is None:
        raise RefusedError("unknown_meter", f"no meter {meter_id!r} is registered")
    if row[0] not in ACCEPTING:
        raise RefusedError("meter_not_accepting", f"{meter_id} is {row[0]}")


def _paired_signature(cur: psycopg.Cursor[Any], challenge_id: UUID) -> tuple[str, str]:
    """(kid, signature) the P1 reader gave for a challenge its pairing code issued."""
    row = cur.execute(
        "SELECT meter_kid, meter_signature FROM pairing_codes WHERE challenge = %s",
        (challenge_id,),
    ).fetchone()
    if row is None:
        raise RefusedError(
            "bad_meter_signature", "no meter signature given and no pairing issued this challenge"
        )
    if row[1] is None:
        raise RefusedError("pairing_not_signed", "the reader has not signed the link document yet")
    return str(row[0]), str(row[1])


def verify_meter_signature(
    cur: psycopg.Cursor[Any], meter_id: str, kid: str, document: str, signature: str
) -> None:
    """The meter's confirmation: `document` signed with its key `kid`, valid now."""
    row = cur.execute(
        "SELECT k.alg, k.public_key_pem FROM meter_keys k JOIN meters m ON m.id = k.meter"
        " WHERE m.meter_id = %s AND k.kid = %s AND k.valid_from <= now()"
        " AND (k.valid_to IS NULL OR k.valid_to > now())",
        (meter_id, kid),
    ).fetchone()
    if row is None:
        raise RefusedError("unknown_kid", f"{meter_id} has no key {kid!r} valid now")
    try:
        key = load_public_key(row[0], row[1])
        raw = b64url_decode(signature.strip())
    except (InvalidKeyError, ValueError) as exc:
        raise RefusedError(
            "bad_meter_signature", f"the meter's signature is unreadable: {exc}"
        ) from exc
    if not key.verify(raw, document.encode("utf-8")):
        raise RefusedError("bad_meter_signature", f"{meter_id}'s key {kid!r} did not sign this")


def challenge_document(conn: Conn, challenge_id: UUID) -> str | None:
    """The exact text a challenge asked to be signed, or None if there is no such one."""
    row = conn.execute(
        "SELECT document FROM wallet_challenges WHERE id = %s", (challenge_id,)
    ).fetchone()
    return None if row is None else str(row[0])
