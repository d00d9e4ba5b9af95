"""What the bridge tests share: a `Fleet` of registered meters that stores signed readings
through ingest's real `ReadingStore`, an in-process bridge `Runner` on a settable `Clock`,
a one-line `query`, and `rfc6962_root`, an independent Merkle root to check roots against."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from meterproof.bridge.ledger.local import LocalSink
from meterproof.bridge.oracle import Oracle
from meterproof.bridge.runner import Runner
from meterproof.bridge.settings import BridgeSettings
from meterproof.ingest.judge import RateLimit
from meterproof.ingest.records import Candidate, Message
from meterproof.ingest.security import QuarantinePolicy
from meterproof.ingest.store import ReadingStore
from meterproof.registry import repository
from meterproof.registry.model import NewKey, NewMeter
from meterproof.schemas.codec import sign_reading
from meterproof.schemas.signatures import PrivateKey, generate_private_key
from meterproof.schemas.signing import reading_hash, signing_bytes

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a multiple of every epoch length used here
EPOCH_MS = 1000


@dataclass
class Fleet:
    """Registered meters that store signed readings through `ingest.store.ReadingStore`."""

    database_url: str
    key: PrivateKey
    wallets: dict[str, str | None]

    def store(self, readings: Sequence[tuple[str, int, int, int, int]]) -> list[str]:
        """(meter_id, seq, ts_ms, import_wh, export_wh) -> outcome kind per reading."""
        candidates = [self.candidate(*r) for r in readings]

        with psycopg.connect(self.database_url, autocommit=True) as conn:
            store = ReadingStore(
                conn,
                limit=RateLimit(window_ms=1000, max_readings=100_000),
                policy=QuarantinePolicy(),
            )
            result = store.commit_batch(candidates, [])
        return [type(o).__name__ for o in result.outcomes]

    def candidate(self, meter_id: str, seq: int, ts: int, imp: int, exp: int) -> Candidate:
        reading = sign_reading(
            {"meter_id": meter_id, "seq": seq, "ts": ts, "import_wh": imp, "export_wh": exp},
            self.key,
        )
        message = signing_bytes(reading)
        return Candidate(
            Message(f"meters/{meter_id}/readings", b"", ts), reading, message,
            reading_hash(message), ts,
        )  # fmt: skip


def make_fleet(
    database_url: str, make_meter_id: Callable[[], str], wallets: Sequence[str | None]
) -> tuple[Fleet, list[str]]:
    key = generate_private_key("EdDSA")
    pem = key.public_key().pem()
    ids = [make_meter_id() for _ in wallets]
    with psycopg.connect(database_url, autocommit=True) as conn:
        repository.register(
            conn,
            [
                NewMeter(m, NewKey.parse("EdDSA", pem), owner_wallet=w)
                for m, w in zip(ids, wallets, strict=True)
            ],
        )
    return Fleet(database_url, key, dict(zip(ids, wallets, strict=True))), ids


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def settings_for(database_url: str, **overrides: Any) -> BridgeSettings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "epoch_seconds": EPOCH_MS // 1000,
        "seal_delay_s": 0,
        "sink_timeout_s": 0.5,
        "retry_initial_s": 0.05,
        "retry_max_s": 0.2,
        "metrics_port": 0,
        **overrides,
    }
    return BridgeSettings(**values)


def in_process(database_url: str, oracle: Oracle, clock: Clock, **overrides: Any) -> Runner:
    settings = settings_for(database_url, **overrides)
    sink = LocalSink(database_url, trusted_key=oracle.public_key, timeout_s=settings.sink_timeout_s)
    return Runner(settings, sink=sink, oracle=oracle, publisher=None, clock=clock, jitter=lambda: 0)


def query(database_url: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def rfc6962_root(leaves: list[bytes]) -> bytes:
    """Straight from RFC 6962 section 2.1, recursive, independent of schemas.merkle."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + rfc6962_root(leaves[:k]) + rfc6962_root(leaves[k:])).digest()
