"""Pairing codes: how a P1 reader, which has no screen for a document, is tied to its
owner's wallet (seed 004's "pair with a shared secret", docs/p1.md "Pairing").

The code only says *which reader*. The link stays the wallet link of registry/wallets.py,
with both of its proofs over one link document:

1. the reader makes an offer: a fresh pairing id, a random code and an expiry, signed
   with its device key (`make_offer`, `register_offer`); only the code's SHA-256 is kept;
2. it shows the code; the owner enters it where they link a wallet, with the wallet's
   account: `claim` spends the code and issues the link challenge, whose document names
   the pairing;
3. the reader sees the claim, checks that the document is a link of *itself* under *its*
   pairing (`check_link_document`) and signs it with its device key (`sign_claim`);
4. the owner signs the same document in the wallet, and `wallets.link_wallet` takes the
   reader's signature from the pairing.

So a code is single use (spent by its claim), short-lived (`CODE_TTL`, at most
`MAX_TTL`), bound to the reader that signed its offer, and never enough on its own: the
link still needs the wallet's signature. Every refusal rolls back, then is recorded as a
`<action>_refused` security event, logged and counted like the wallet link's own.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from uuid import UUID

import psycopg
import structlog

from meterproof.registry import documents
from meterproof.registry.accounts import AccountId
from meterproof.registry.errors import InvalidInputError, RefusedError
from meterproof.registry.model import check_meter_id
from meterproof.registry.telemetry import CHANGES, record_refusal
from meterproof.registry.wallets import (
    Challenge,
    accepting_meter,
    issue_challenge,
    verify_meter_signature,
)

Conn = psycopg.Connection[Any]
log = structlog.get_logger("registry.pairing")

CODE_TTL: Final = timedelta(minutes=10)
MAX_TTL: Final = timedelta(minutes=30)
#: Crockford's base32: no I, L, O or U, so a code read off a terminal is typed right.
ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: 8 characters, 40 bits: guessing one live code among a few is hopeless within its ten
#: minutes, and a lucky guess still links nothing without the wallet and the reader.
CODE_LENGTH: Final = 8
_READS_AS: Final = str.maketrans({"O": "0", "I": "1", "L": "1"})


@dataclass(frozen=True, slots=True)
class Offer:
    """What the reader shows (`code`) and signs (`document`)."""

    id: UUID
    meter_id: str
    code: str
    expires_at: datetime
    document: str

    @property
    def shown(self) -> str:
        return f"{self.code[:4]}-{self.code[4:]}"


@dataclass(frozen=True, slots=True)
class PairingState:
    """What the reader polls: whether its code was entered, and the document to sign."""

    claimed: bool
    expired: bool
    signed: bool
    document: str | None


def normalise(code: str) -> str:
    """The code as stored: upper case, without the dash or spaces, O read as 0, I/L as 1."""
    return "".join(code.split()).replace("-", "").upper().translate(_READS_AS)


def code_sha256(code: str) -> bytes:
    return hashlib.sha256(normalise(code).encode("ascii", "replace")).digest()


def make_offer(meter_id: str, *, ttl: timedelta = CODE_TTL) -> Offer:
    """A new code and the offer document the reader signs for it."""
    if not timedelta(seconds=1) <= ttl <= MAX_TTL:
        raise InvalidInputError(f"a pairing code lives 1 s to {MAX_TTL}, not {ttl}")
    pairing_id = uuid.uuid4()
    code = "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))
    expires_at = datetime.now(UTC).replace(microsecond=0) + ttl
    document = documents.render(
        documents.PAIR_READER,
        [
            ("meter", check_meter_id(meter_id)),
            ("pairing", str(pairing_id)),
            ("code_sha256", code_sha256(code).hex()),
            ("valid_until", documents.timestamp(expires_at)),
        ],
    )
    return Offer(pairing_id, meter_id, code, expires_at, document)


def register_offer(conn: Conn, document: str, *, kid: str, signature: str) -> UUID:
    """Store the reader's signed offer; its code can be claimed from now until it expires."""
    kind, fields = documents.parse(document)
    try:
        meter_id = check_meter_id(fields["meter"])
        pairing_id = UUID(fields["pairing"])
        digest = bytes.fromhex(fields["code_sha256"])
        expires_at = documents.parse_timestamp(fields["valid_until"])
    except (KeyError, ValueError) as exc:
        raise InvalidInputError(f"not a pairing offer: {exc}") from None
    if kind != documents.PAIR_READER or len(digest) != 32:
        raise InvalidInputError(f"not a pairing offer: a {kind} document")
    try:
        with conn.transaction(), conn.cursor() as cur:
            accepting_meter(conn, meter_id)
            verify_meter_signature(cur, meter_id, kid, document, signature)
            row = cur.execute(
                "INSERT INTO pairing_codes (id, meter_id, code_sha256, offer, offer_kid,"
                " offer_signature, expires_at) SELECT %s, %s, %s, %s, %s, %s, %s"
                " WHERE %s > now() AND %s <= now() + %s RETURNING id",
                (pairing_id, meter_id, digest, document, kid, signature.strip(), expires_at,
                 expires_at, expires_at, MAX_TTL),
            ).fetchone()  # fmt: skip
            if row is None:
                raise RefusedError(
                    "invalid_period", f"a pairing code must expire within {MAX_TTL} from now"
                )
    except RefusedError as refusal:
        record_refusal(conn, "pair_offer", refusal, meter_id=meter_id, account=None)
        raise
    CHANGES.labels(action="pair_offer").inc()
    log.info("pairing_offered", meter_id=meter_id, pairing=str(pairing_id),
             valid_until=documents.timestamp(expires_at))  # fmt: skip
    return pairing_id


def claim(conn: Conn, code: str, account: AccountId, *, meter_id: str | None = None) -> Challenge:
    """The owner's step: the code names the reader; spend it and issue the link challenge
    (its document names the pairing), which the reader and the wallet then both sign.

    Refused: `pairing_code_unknown` (no reader shows it, or, with `meter_id`, not that
    reader: a code of another meter is not spent), `pairing_code_used` (entered before),
    `pairing_code_expired`, and the meter's own refusals (`meter_not_accepting`).
    """
    expected = meter_id
    try:
        with conn.transaction(), conn.cursor() as cur:
            row = cur.execute(
                "SELECT id, meter_id, claimed_at, expires_at, expires_at <= now()"
                " FROM pairing_codes WHERE code_sha256 = %s FOR UPDATE",
                (code_sha256(code),),
            ).fetchone()
            if row is None or expected not in (None, row[1]):
                raise RefusedError(
                    "pairing_code_unknown",
                    f"no reader{'' if expected is None else f' {expected}'} shows this code",
                )
            pairing_id, meter_id, claimed_at, expires_at, expired = row
            if claimed_at is not None:
                raise RefusedError(
                    "pairing_code_used", f"this pairing code was entered at {claimed_at}"
                )
            if expired:
                raise RefusedError(
                    "pairing_code_expired", f"this pairing code expired at {expires_at}"
                )
            accepting_meter(conn, meter_id)
            challenge = issue_challenge(
                conn,
                purpose=documents.LINK_WALLET,
                account=account,
                meter_id=meter_id,
                fields=[("meter", meter_id), ("wallet", str(account)),
                        ("pairing", str(pairing_id))],
            )  # fmt: skip
            cur.execute(
                "UPDATE pairing_codes SET claimed_at = now(), challenge = %s WHERE id = %s",
                (challenge.id, pairing_id),
            )
    except RefusedError as refusal:
        record_refusal(conn, "pair_reader", refusal, meter_id=meter_id, account=str(account))
        raise
    CHANGES.labels(action="pair_reader").inc()
    log.info("pairing_claimed", meter_id=meter_id, pairing=str(pairing_id),
             account=str(account), challenge=str(challenge.id))  # fmt: skip
    return challenge


def state(conn: Conn, pairing_id: UUID) -> PairingState:
    """The reader's view of its offer."""
    row = conn.execute(
        "SELECT p.claimed_at IS NOT NULL, p.expires_at <= now(), p.signed_at IS NOT NULL,"
        " c.document FROM pairing_codes p LEFT JOIN wallet_challenges c ON c.id = p.challenge"
        " WHERE p.id = %s",
        (pairing_id,),
    ).fetchone()
    if row is None:
        raise RefusedError("pairing_code_unknown", f"no pairing {pairing_id}")
    return PairingState(bool(row[0]), bool(row[1]), bool(row[2]), row[3])


def check_link_document(document: str, *, meter_id: str, pairing_id: UUID) -> str:
    """The wallet a claimed document would link, once it is checked to be a wallet link
    of this reader under this pairing: a reader signs nothing else."""
    kind, fields = documents.parse(document)
    if (
        kind != documents.LINK_WALLET
        or fields.get("meter") != meter_id
        or fields.get("pairing") != str(pairing_id)
        or "wallet" not in fields
    ):
        raise RefusedError(
            "pairing_document_mismatch",
            f"the claimed document is not a wallet link of {meter_id} under pairing {pairing_id}",
        )
    return fields["wallet"]


def sign_claim(conn: Conn, pairing_id: UUID, *, kid: str, signature: str) -> None:
    """The reader's half of the link: its device-key signature over the claimed document,
    checked now so a bad one is refused at once rather than when the owner links."""
    meter_id: str | None = None
    try:
        with conn.transaction(), conn.cursor() as cur:
            row = cur.execute(
                "SELECT p.meter_id, c.document, p.signed_at FROM pairing_codes p"
                " LEFT JOIN wallet_challenges c ON c.id = p.challenge WHERE p.id = %s"
                " FOR UPDATE OF p",
                (pairing_id,),
            ).fetchone()
            if row is None:
                raise RefusedError("pairing_code_unknown", f"no pairing {pairing_id}")
            meter_id, document, signed_at = row
            if document is None:
                raise RefusedError("pairing_not_claimed", "nobody has entered the code yet")
            if signed_at is not None:
                raise RefusedError("pairing_code_used", f"signed already at {signed_at}")
            verify_meter_signature(cur, meter_id, kid, document, signature)
            cur.execute(
                "UPDATE pairing_codes SET meter_kid = %s, meter_signature = %s,"
                " signed_at = now() WHERE id = %s",
                (kid, signature.strip(), pairing_id),
            )
    except RefusedError as refusal:
        record_refusal(conn, "pair_sign", refusal, meter_id=meter_id, account=None)
        raise
    CHANGES.labels(action="pair_sign").inc()
    log.info("pairing_signed", meter_id=meter_id, pairing=str(pairing_id))
