"""`meterproof p1 pair`: the reader's side of a pairing (registry/pairing.py).

The reader signs an offer for a fresh code, shows the code (terminal line and the
`p1.pairing_code` log line), then waits until its owner enters it where they link a
wallet. It signs the link document that claim produced, after checking it names this
reader and this pairing, and stops: the owner's wallet signature completes the link. A
code nobody entered before it expired ends the run with `pairing_code_expired`.

This talks to the registry's database, as the other commands of a development stack do;
a reader in a home would make the same three calls through the HTTPS API.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

import psycopg
import structlog
from prometheus_client import Counter

from meterproof.meter.identity import MeterIdentity
from meterproof.registry import pairing
from meterproof.registry.errors import RefusedError
from meterproof.registry.model import default_kid
from meterproof.schemas.reading import b64url

log = structlog.get_logger("meter.p1.pairing")

PAIRINGS = Counter(
    "meterproof_p1_pairings_total", "Pairing runs of the P1 reader by how they ended", ["outcome"]
)
SIGNED: Final = "signed"
POLL_S: Final = 0.5


@dataclass(frozen=True, slots=True)
class PairingResult:
    """`outcome` is `signed` or the reason code that ended the run."""

    outcome: str
    wallet: str | None = None


def _sign(identity: MeterIdentity, text: str) -> tuple[str, str]:
    key = identity.key
    return default_kid(key.public_key().pem()), b64url(key.sign(text.encode("utf-8")))


def pair(
    identity: MeterIdentity,
    conn: psycopg.Connection[object],
    *,
    ttl: timedelta,
    show: Callable[[str], None],
    poll_s: float = POLL_S,
) -> PairingResult:
    """Offer a code, show it, and sign its claim; see the module."""
    offer = pairing.make_offer(identity.meter_id, ttl=ttl)
    kid, signature = _sign(identity, offer.document)
    pairing.register_offer(conn, offer.document, kid=kid, signature=signature)
    valid_until = f"{offer.expires_at:%Y-%m-%d %H:%M:%S} UTC"
    log.info("p1.pairing_code", meter_id=identity.meter_id, code=offer.shown,
             pairing=str(offer.id), valid_until=valid_until)  # fmt: skip
    show(f"pairing code: {offer.shown}  (valid until {valid_until}; enter it where you link "
         "your wallet)")  # fmt: skip
    try:
        while True:
            now = pairing.state(conn, offer.id)
            if now.document is not None:
                break
            if now.expired:
                raise RefusedError("pairing_code_expired", f"nobody entered it by {valid_until}")
            time.sleep(poll_s)
        wallet = pairing.check_link_document(
            now.document, meter_id=identity.meter_id, pairing_id=offer.id
        )
        kid, signature = _sign(identity, now.document)
        pairing.sign_claim(conn, offer.id, kid=kid, signature=signature)
    except RefusedError as refusal:
        PAIRINGS.labels(outcome=refusal.code).inc()
        log.warning("p1.pairing_refused", meter_id=identity.meter_id, pairing=str(offer.id),
                    reason=refusal.code, detail=str(refusal))  # fmt: skip
        return PairingResult(refusal.code)
    PAIRINGS.labels(outcome=SIGNED).inc()
    log.info("p1.pairing_signed", meter_id=identity.meter_id, pairing=str(offer.id),
             wallet=wallet)  # fmt: skip
    show(f"signed the link to {wallet}; the owner completes it with the wallet's signature")
    return PairingResult(SIGNED, wallet)
