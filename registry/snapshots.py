"""What ingestion needs to know of a meter, read in one query for a whole batch: its
status and its signing keys, parsed. The worker's key cache (`ingest.keys`) holds these
and drops one when the registry's trigger NOTIFYs `CHANNEL` with its meter id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import structlog
from psycopg import AsyncConnection

from meterproof.schemas.signatures import InvalidKeyError, PublicKey, load_public_key
from meterproof.schemas.timestamps import dt_to_ms

#: The NOTIFY channel of db/migrations/0001_registry.sql: every status or key change,
#: after commit, with the meter id as payload.
CHANNEL: Final = "meterproof_registry"
log = structlog.get_logger("registry.snapshots")

_FETCH = """
SELECT m.meter_id, m.status::text, k.kid, k.alg, k.public_key_pem, k.valid_from, k.valid_to
FROM unnest(%s::text[]) AS u(meter_id)
JOIN meters m USING (meter_id) LEFT JOIN meter_keys k ON k.meter = m.id
"""  # a join: `= ANY(...)` compared every meter with every id asked for (see ingest.store)


@dataclass(frozen=True, slots=True)
class RegisteredKey:
    kid: str
    key: PublicKey
    valid_from_ms: int
    valid_to_ms: int | None

    def valid_at(self, now_ms: int) -> bool:
        return self.valid_from_ms <= now_ms and (
            self.valid_to_ms is None or now_ms <= self.valid_to_ms
        )


@dataclass(frozen=True, slots=True)
class MeterSnapshot:
    """What the registry says about one meter at the time of the check."""

    meter_id: str
    status: str
    keys: tuple[RegisteredKey, ...]


async def fetch_snapshots(
    conn: AsyncConnection[tuple[object, ...]], meter_ids: Sequence[str]
) -> dict[str, MeterSnapshot]:
    """The registered meters among `meter_ids` (an unknown one is absent). A stored key
    that no longer parses is left out and logged: its readings then fail as unsigned by
    a registered key, which is what the operator must see."""
    async with conn.cursor() as cur:
        await cur.execute(_FETCH, (list(meter_ids),))
        rows = await cur.fetchall()
    statuses: dict[str, str] = {}
    keys: dict[str, list[RegisteredKey]] = {}
    for meter_id, status, kid, alg, pem, valid_from, valid_to in rows:
        mid = str(meter_id)
        statuses[mid] = str(status)
        keys.setdefault(mid, [])
        if pem is None:
            continue
        try:
            key = load_public_key(str(alg), str(pem))
        except InvalidKeyError as exc:
            log.error("registered_key_unusable", meter_id=mid, kid=kid, error=str(exc))
            continue
        keys[mid].append(
            RegisteredKey(
                str(kid),
                key,
                dt_to_ms(valid_from),  # type: ignore[arg-type]
                None if valid_to is None else dt_to_ms(valid_to),  # type: ignore[arg-type]
            )
        )
    return {m: MeterSnapshot(m, statuses[m], tuple(keys[m])) for m in statuses}
