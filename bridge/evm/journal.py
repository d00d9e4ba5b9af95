"""The evm sink's record of the transactions it signed (table `evm_transactions`,
db/migrations/0006): committed before each broadcast, so a bridge killed at any point
knows what it may have sent, and under which nonce and fees.

`sent_at` is the database's `now()` when the row was written, so a transaction's age is
asked of the database too (`now() - sent_at`): one clock for both ends, whatever the
bridge host's clock says and whichever host wrote the row.

The oracle account also sends `chain release`'s transactions. Both pick its next nonce
under one advisory lock (`nonce_lock_key`): the sink journals a transaction only while it
can take the lock, `chain release` holds it from its check that no journalled transaction
is in flight until its own is mined, so neither takes the other's nonce."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg.rows import tuple_row

from meterproof.db.silence import connected

_RECORD: Final = """
INSERT INTO evm_transactions (tx_hash, idempotency_key, chain_id, sender, nonce, max_fee_wei,
    priority_fee_wei, raw) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (tx_hash) DO NOTHING
"""
_SENT: Final = """
SELECT tx_hash, nonce, max_fee_wei, priority_fee_wei, raw,
    extract(epoch FROM now() - sent_at)::float8 FROM evm_transactions
WHERE idempotency_key = %s ORDER BY sent_at, nonce
"""


_IN_FLIGHT: Final = """
SELECT tx_hash, nonce FROM evm_transactions WHERE chain_id = %s AND sender = %s AND nonce >= %s
ORDER BY sent_at DESC LIMIT 1
"""


def nonce_lock_key(chain_id: int, sender: str) -> int:
    """The advisory lock key of `sender`'s nonces on `chain_id`."""
    text = f"meterproof evm nonce {chain_id} {sender.lower()}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


def in_flight(
    conn: psycopg.Connection[Any], *, chain_id: int, sender: str, mined_nonce: int
) -> tuple[bytes, int] | None:
    """(hash, nonce) of the newest journalled transaction of `sender` whose nonce is not
    mined yet (`mined_nonce`: the account's transaction count at the latest block)."""
    row = conn.execute(_IN_FLIGHT, (chain_id, sender, mined_nonce)).fetchone()
    return None if row is None else (bytes(row[0]), int(row[1]))


@dataclass(frozen=True, slots=True)
class Sent:
    tx_hash: bytes
    nonce: int
    max_fee_wei: int
    priority_fee_wei: int
    raw: bytes
    age_s: float = 0.0  #: since it was journalled, by the database's clock


class Journal:
    """Each call on a connection of its own, none waiting on the database longer than
    `timeout_s` (a server gone silent: `meterproof.db.silence`)."""

    def __init__(self, database_url: str, *, timeout_s: float) -> None:
        self._url = database_url
        self._timeout_s = timeout_s

    def record(self, key: str, *, chain_id: int, sender: str, sent: Sent) -> bool:
        """Commit `sent` before it is broadcast; False, with nothing written, while `chain
        release` holds the sender's nonce lock."""
        with (
            connected(self._url, within_s=self._timeout_s, wait="journal") as conn,
            conn.transaction(),
        ):
            locked = conn.execute(
                "SELECT pg_try_advisory_xact_lock(%s)", (nonce_lock_key(chain_id, sender),)
            ).fetchone()
            if locked is None or not locked[0]:
                return False
            conn.execute(
                _RECORD,
                (sent.tx_hash, key, chain_id, sender, sent.nonce, sent.max_fee_wei,
                 sent.priority_fee_wei, sent.raw),
            )  # fmt: skip
        return True

    def sent(self, key: str) -> list[Sent]:
        """Every transaction signed for this key, oldest first."""
        with (
            connected(self._url, within_s=self._timeout_s, wait="journal") as conn,
            conn.cursor(row_factory=tuple_row) as cur,
        ):
            rows = cur.execute(_SENT, (key,)).fetchall()
        return [
            Sent(bytes(h), int(n), int(f), int(p), bytes(r), float(age))
            for h, n, f, p, r, age in rows
        ]
