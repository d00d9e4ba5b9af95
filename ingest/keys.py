"""The key store: registry snapshots (status + signing keys) cached in-process.

A hit costs a dict lookup; misses are fetched for a whole batch in one query. Entries live
`ttl_s` at most, and a LISTEN on `meterproof_registry` (a trigger NOTIFYs on every status or
key change) drops a meter's entry at once, so a quarantine or a revocation is honoured by
every running worker within a second. If the LISTEN connection is lost, the whole cache is
dropped and rebuilt, because notifications may have been missed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Collection, Mapping
from typing import Final

import psycopg
import structlog
from psycopg import AsyncConnection

from meterproof.errors import UnavailableError
from meterproof.ingest.telemetry import DEPENDENCY_ERRORS
from meterproof.ingest.verify import MeterSnapshot, RegisteredKey
from meterproof.schemas.signatures import InvalidKeyError, load_public_key
from meterproof.schemas.timestamps import dt_to_ms

CHANNEL: Final = "meterproof_registry"
log = structlog.get_logger("ingest.keys")

_FETCH = """
SELECT m.meter_id, m.status::text, k.kid, k.alg, k.public_key_pem, k.valid_from, k.valid_to
FROM unnest(%s::text[]) AS u(meter_id)
JOIN meters m USING (meter_id) LEFT JOIN meter_keys k ON k.meter = m.id
"""  # a join: `= ANY(...)` compared every meter with every id asked for (see ingest.store)


class KeyCache:
    def __init__(self, *, database_url: str, ttl_s: float) -> None:
        self._url = database_url
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, MeterSnapshot | None]] = {}
        self._conn: AsyncConnection[tuple[object, ...]] | None = None
        self.listening = asyncio.Event()

    def invalidate(self, meter_id: str) -> None:
        self._entries.pop(meter_id, None)

    async def snapshots(self, meter_ids: Collection[str]) -> Mapping[str, MeterSnapshot | None]:
        now = time.monotonic()
        found: dict[str, MeterSnapshot | None] = {}
        missing: list[str] = []
        for meter_id in meter_ids:
            entry = self._entries.get(meter_id)
            if entry is not None and entry[0] > now:
                found[meter_id] = entry[1]
            else:
                missing.append(meter_id)
        if missing:
            fetched = await self._fetch(missing)
            now = time.monotonic()
            for meter_id in missing:
                snapshot = fetched.get(meter_id)
                self._entries[meter_id] = (now + self.lifetime(), snapshot)
                found[meter_id] = snapshot
        return found

    def lifetime(self) -> float:
        """Between half the TTL and all of it: a fleet cached at once (a start, a burst)
        must not expire at once, or every TTL one batch would refetch and parse every
        meter's key while its readings wait."""
        return self._ttl_s * random.uniform(0.5, 1.0)  # noqa: S311 - spread, not secrecy

    async def _fetch(self, meter_ids: list[str]) -> dict[str, MeterSnapshot]:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await AsyncConnection.connect(self._url, autocommit=True)
            async with self._conn.cursor() as cur:
                await cur.execute(_FETCH, (meter_ids,))
                rows = await cur.fetchall()
        except psycopg.Error as exc:
            if self._conn is not None:
                await self._conn.close()
            raise UnavailableError("database", f"key lookup: {exc}") from exc
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

    async def listen(self, stop: asyncio.Event, *, retry_s: float = 1.0) -> None:
        """Run until `stop`: invalidate on every notification, reconnect after a loss."""
        while not stop.is_set():
            try:
                async with await AsyncConnection.connect(self._url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._entries.clear()
                    self.listening.set()
                    while not stop.is_set():
                        async for notice in conn.notifies(timeout=1.0):
                            self.invalidate(notice.payload)
                    return
            except psycopg.Error as exc:
                DEPENDENCY_ERRORS.labels(dependency="database").inc()
                log.warning("registry_listen_lost", error=str(exc), retry_in_s=retry_s)
            self.listening.clear()
            self._entries.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), retry_s)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
