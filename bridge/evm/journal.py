"""The evm sink's record of the transactions it signed (table `evm_transactions`,
db/migrations/0006): committed before each broadcast, so a bridge killed at any point
knows what it may have sent, and under which nonce and fees."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import psycopg
from psycopg.rows import tuple_row

from meterproof.schemas.timestamps import dt_to_ms

_RECORD: Final = """
INSERT INTO evm_transactions (tx_hash, idempotency_key, chain_id, sender, nonce, max_fee_wei,
    priority_fee_wei, raw) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (tx_hash) DO NOTHING
"""
_SENT: Final = """
SELECT tx_hash, nonce, max_fee_wei, priority_fee_wei, raw, sent_at FROM evm_transactions
WHERE idempotency_key = %s ORDER BY sent_at, nonce
"""


@dataclass(frozen=True, slots=True)
class Sent:
    tx_hash: bytes
    nonce: int
    max_fee_wei: int
    priority_fee_wei: int
    raw: bytes
    sent_at_ms: int = 0


class Journal:
    def __init__(self, database_url: str, *, timeout_s: float) -> None:
        self._url = database_url
        self._timeout = max(1, round(timeout_s))

    def record(self, key: str, *, chain_id: int, sender: str, sent: Sent) -> None:
        with psycopg.connect(self._url, autocommit=True, connect_timeout=self._timeout) as conn:
            conn.execute(
                _RECORD,
                (sent.tx_hash, key, chain_id, sender, sent.nonce, sent.max_fee_wei,
                 sent.priority_fee_wei, sent.raw),
            )  # fmt: skip

    def sent(self, key: str) -> list[Sent]:
        """Every transaction signed for this key, oldest first."""
        with (
            psycopg.connect(self._url, autocommit=True, connect_timeout=self._timeout) as conn,
            conn.cursor(row_factory=tuple_row) as cur,
        ):
            rows = cur.execute(_SENT, (key,)).fetchall()
        return [
            Sent(bytes(h), int(n), int(f), int(p), bytes(r), dt_to_ms(at))
            for h, n, f, p, r, at in rows
        ]
