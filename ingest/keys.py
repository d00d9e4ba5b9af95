"""The key store: registry snapshots (status + signing keys) cached in-process.

A hit costs a dict lookup; misses are fetched for a whole batch in one query. A LISTEN on
`meterproof_registry` (a trigger NOTIFYs on every status or key change) drops a meter's
entry at once, so a quarantine or a revocation is honoured by every running worker within a
second. If the LISTEN connection is lost, the whole cache is dropped and rebuilt, because
notifications may have been missed meanwhile. A fetch during which any entry was dropped is
used for its batch but not kept: its answer may predate the change that was notified.

So the notifications keep the cache true, and `ttl_s` is only a bound on a cache that
missed one anyway. It must be longer than a meter's reporting interval, or every reading
of a fleet reporting each minute or quarter-hour pays a registry query and a key parse
(docs/scaling.md, "Live path profile").
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Collection, Mapping
from functools import partial

import psycopg
import structlog
from psycopg import AsyncConnection

from meterproof.db.connect import connect_async
from meterproof.db.silence import ListenProbe, answered, bounded, cut
from meterproof.errors import UnavailableError
from meterproof.ingest.telemetry import DEPENDENCY_ERRORS
from meterproof.registry.snapshots import CHANNEL, MeterSnapshot, fetch_snapshots

log = structlog.get_logger("ingest.keys")


class KeyCache:
    def __init__(self, *, database_url: str, ttl_s: float, timeout_s: float) -> None:
        """`timeout_s`: how long a lookup or the listen may go unanswered
        (`meterproof.db.silence`)."""
        self._url = bounded(database_url, timeout_s)
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._entries: dict[str, tuple[float, MeterSnapshot | None]] = {}
        self._drops = 0  # entries dropped so far: a fetch that saw it move keeps nothing
        self._conn: AsyncConnection[tuple[object, ...]] | None = None
        #: The listen was lost: the lookups' connection, to the same server, is made again
        #: too, or after a failover from a silent primary the next lookup would wait on it.
        self._renew = False
        self.listening = asyncio.Event()

    def invalidate(self, meter_id: str) -> None:
        self._entries.pop(meter_id, None)
        self._drops += 1

    def _clear(self) -> None:
        self._entries.clear()
        self._drops += 1

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
            drops = self._drops
            fetched = await self._fetch(missing)
            keep = drops == self._drops
            now = time.monotonic()
            for meter_id in missing:
                snapshot = fetched.get(meter_id)
                if keep:
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
            if self._renew and self._conn is not None:
                await self._conn.close()
            if self._conn is None or self._conn.closed:
                self._renew = False
                self._conn = await self._connect()
            return await answered(
                fetch_snapshots(self._conn, meter_ids),
                within_s=self._timeout_s,
                cut_off=partial(cut, self._conn),
                wait="key_lookup",
            )
        except psycopg.Error as exc:
            if self._conn is not None:
                await self._conn.close()
            raise UnavailableError("database", f"key lookup: {exc}") from exc

    async def listen(self, stop: asyncio.Event, *, retry_s: float = 1.0) -> None:
        """Run until `stop`: invalidate on every notification, reconnect after a loss."""
        while not stop.is_set():
            try:
                async with await self._connect() as conn:
                    await answered(
                        conn.execute(f"LISTEN {CHANNEL}"),
                        within_s=self._timeout_s,
                        cut_off=partial(cut, conn),
                        wait="registry_listen",
                    )
                    self._clear()
                    self.listening.set()
                    probe = ListenProbe(conn, within_s=self._timeout_s, wait="registry_listen")
                    while not stop.is_set():
                        async for notice in conn.notifies(timeout=1.0):
                            self.invalidate(notice.payload)
                        await probe.when_due()
                    return
            except psycopg.Error as exc:
                DEPENDENCY_ERRORS.labels(dependency="database").inc()
                log.warning("registry_listen_lost", error=str(exc), retry_in_s=retry_s)
            self.listening.clear()
            self._clear()
            self._renew = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), retry_s)

    async def _connect(self) -> AsyncConnection[tuple[object, ...]]:
        return await connect_async(self._url, autocommit=True)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
