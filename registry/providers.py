"""Seed 003's providers in the registry: a provider is a meter whose key's kid is the
provider id, plus the seed's business fields (db/migrations/0008_providers.sql).

Registering one registers its meter, active, with the provider's Ed25519 key, in the same
transaction as the provider's row: the ingest pipeline then judges its readings with the
registry snapshots it already caches (and forgets on NOTIFY), and the provider is active
exactly while its meter accepts readings. The signed bytes of every stored provider
reading are kept (`provider_readings`, written by the API's store) and read back here for
whoever re-verifies them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import psycopg

from meterproof.errors import ConflictError
from meterproof.registry import repository
from meterproof.registry.errors import RegistryError
from meterproof.registry.model import MeterStatus, NewKey, NewMeter
from meterproof.schemas.provider import ProviderRegistration, b64decode, registration_bytes
from meterproof.schemas.reading import Alg
from meterproof.schemas.signatures import Ed25519Public

Conn = psycopg.Connection[Any]


class ProviderExistsError(RegistryError, ConflictError):
    """The provider id, its meter or its key is registered already; `code` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Provider:
    provider_id: str
    meter_id: str
    status: str
    stake_amount_ct: int
    registered_at: datetime


@dataclass(frozen=True, slots=True)
class KeptReading:
    """A stored provider reading as its provider signed it."""

    provider_id: str
    meter_id: str
    seq: int
    reading_hash: bytes
    signed_bytes: bytes
    signature: bytes
    public_key: bytes


_INSERT: Final = """
INSERT INTO providers (provider_id, meter_id, public_key, owner, location, capacity_kwh,
    price_per_kwh, stake_amount_ct, registration, registration_sig, registered_by)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
RETURNING registered_at
"""
_TAKEN: Final = """
SELECT CASE WHEN provider_id = %s THEN 'provider_exists' ELSE 'key_registered' END
FROM providers WHERE provider_id = %s OR public_key = %s LIMIT 1
"""
_KEPT: Final = """
SELECT k.provider_id, k.meter_id, k.seq, k.reading_hash, k.signed_bytes, k.signature,
       p.public_key
FROM provider_readings k JOIN providers p USING (provider_id)
WHERE k.reading_hash = %s
"""


def register(conn: Conn, r: ProviderRegistration, *, by: str) -> Provider:
    """The provider and its meter, active, all or nothing; `ProviderExistsError` when the
    provider id, the meter or the key is taken. The caller checked the signature."""
    public_key = b64decode(r.public_key)
    key = NewKey.parse(Alg.EDDSA.value, Ed25519Public(public_key).pem(), kid=r.provider_id)
    meter = NewMeter(r.meter_address, key, status=MeterStatus.ACTIVE)
    try:
        with conn.transaction():
            taken = conn.execute(_TAKEN, (r.provider_id, r.provider_id, public_key)).fetchone()
            if taken is not None:
                raise ProviderExistsError(str(taken[0]), f"provider {r.provider_id} or its key")
            try:
                repository.register(conn, [meter])
            except ConflictError as exc:
                raise ProviderExistsError("meter_exists", str(exc)) from None
            row = conn.execute(
                _INSERT,
                (r.provider_id, r.meter_address, public_key, r.owner, r.location,
                 r.capacity_kwh, r.price_per_kwh, r.stake_amount_ct, registration_bytes(r),
                 b64decode(r.signature), by),
            ).fetchone()  # fmt: skip
    except psycopg.errors.UniqueViolation as exc:  # registered concurrently
        raise ProviderExistsError("provider_exists", str(exc.diag.message_detail)) from None
    assert row is not None, "INSERT ... RETURNING returns its row"
    return Provider(
        r.provider_id, r.meter_address, MeterStatus.ACTIVE.value, r.stake_amount_ct, row[0]
    )


def kept_reading(conn: Conn, reading_hash: bytes) -> KeptReading | None:
    """The provider's signed bytes of a stored reading; None if it is not a provider's."""
    row = conn.execute(_KEPT, (reading_hash,)).fetchone()
    if row is None:
        return None
    provider_id, meter_id, seq, digest, signed, signature, public_key = row
    return KeptReading(
        str(provider_id), str(meter_id), int(seq), bytes(digest), bytes(signed),
        bytes(signature), bytes(public_key),
    )  # fmt: skip


_CREDIT: Final = """
SELECT l.export_wh - coalesce((
    SELECT b.export_wh FROM reading_log b WHERE b.meter_id = l.meter_id AND b.ts < l.ts
    ORDER BY b.ts DESC LIMIT 1), l.export_wh)
FROM reading_log l WHERE l.meter_id = %s AND l.seq = %s
"""


async def credit_wh(conn: psycopg.AsyncConnection[Any], meter_id: str, seq: int) -> int | None:
    """What a stored reading adds to its meter's export register over the stored reading
    before it in time (0 for a meter's first): the energy the ledger will mint for it,
    unless a later-arriving earlier reading splits it. None if it is not stored."""
    cur = await conn.execute(_CREDIT, (meter_id, seq))
    row = await cur.fetchone()
    return None if row is None else int(row[0])
