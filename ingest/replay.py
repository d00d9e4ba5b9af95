"""The replay fast path: Redis remembers recently committed (meter_id, seq) -> hash.

It only ever *shortens* work: a hit with the same hash is a duplicate that needs no database
round trip (broker redeliveries, meters republishing unreceipted readings). A miss, a hit
with another hash, or Redis being down all fall through to the database, which is the
final judge. Entries are written only after commit and expire after `ttl_s`, which bounds
memory (~130 bytes a key: 20,000 meters at one reading per 5 s for 15 min is ~470 MB;
lower the TTL for bigger fleets - only the memory of recent redeliveries is lost).

What a batch remembers is sent with a later batch's look-up, in one round trip: under
live load a worker makes a transaction every few readings, and the two round trips per
batch were a sixth of the workers' sampled CPU at 1,000 readings/s (docs/scaling.md,
"Live path profile"). A duplicate that arrives before its entry reached Redis is judged
by the database, as on any miss.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final, Protocol

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from meterproof.ingest.telemetry import DEPENDENCY_ERRORS

_HASH_BYTES: Final = 16  # a truncated SHA-256 is plenty to tell "same reading" apart
#: One call per batch: a pipeline of SET .. EX cost ~10 us of worker CPU per reading in
#: redis-py's per-command bookkeeping; one script call with flat arguments costs a fraction.
_REMEMBER: Final = """
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'EX', ttl)
end
return #KEYS
"""
log = structlog.get_logger("ingest.replay")


class ReplayCache(Protocol):
    async def lookup(self, keys: Sequence[tuple[str, int]]) -> list[bytes | None]: ...

    async def remember(self, entries: Sequence[tuple[str, int, bytes]]) -> None: ...

    async def close(self) -> None: ...


def _key(meter_id: str, seq: int) -> str:
    return f"mp:seen:{meter_id}:{seq}"


def same_reading(cached: bytes, reading_hash: bytes) -> bool:
    return cached == reading_hash[:_HASH_BYTES]


class RedisReplayCache:
    """After a failure, Redis is left alone for `cooldown_s` so a dead server costs one
    timeout, not one per batch."""

    #: Entries kept for the next look-up at most; past this `remember` sends them at once.
    PENDING_MAX: Final = 10_000

    def __init__(
        self, url: str, *, ttl_s: int, timeout_s: float = 0.5, cooldown_s: float = 5.0
    ) -> None:
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._ttl_s = ttl_s
        self._cooldown_s = cooldown_s
        self._down_until = 0.0
        self._pending_keys: list[str] = []
        self._pending_values: list[bytes] = []

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: RedisError) -> None:
        DEPENDENCY_ERRORS.labels(dependency="redis").inc()
        log.warning("redis_unavailable", error=str(exc), retry_in_s=self._cooldown_s)
        self._down_until = time.monotonic() + self._cooldown_s

    async def _send(self, keys: Sequence[str]) -> list[bytes | None]:
        """The pending entries (as one script call) and an MGET of `keys`, in one round
        trip; the pending entries are gone either way (a cache may forget)."""
        remember_keys, values = self._pending_keys, self._pending_values
        self._pending_keys, self._pending_values = [], []
        if not self._available():
            return [None] * len(keys)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                if remember_keys:
                    # EVAL, not a registered script: redis-py checks a pipeline's scripts
                    # with SCRIPT EXISTS first, a round trip more; Redis caches the body.
                    pipe.eval(_REMEMBER, len(remember_keys), *remember_keys, self._ttl_s, *values)
                if keys:
                    pipe.mget(list(keys))
                replies = await pipe.execute()
        except RedisError as exc:
            self._failed(exc)
            return [None] * len(keys)
        found = replies[-1] if keys else []
        return [v if isinstance(v, bytes) else None for v in found]

    async def lookup(self, keys: Sequence[tuple[str, int]]) -> list[bytes | None]:
        if not keys and not self._pending_keys:
            return []
        return await self._send([_key(m, s) for m, s in keys])

    async def remember(self, entries: Sequence[tuple[str, int, bytes]]) -> None:
        """Kept for the next look-up (see the module), or sent now past `PENDING_MAX`."""
        for meter_id, seq, digest in entries:
            self._pending_keys.append(_key(meter_id, seq))
            self._pending_values.append(digest[:_HASH_BYTES])
        if len(self._pending_keys) > self.PENDING_MAX:
            await self._send([])

    async def close(self) -> None:
        if self._pending_keys:
            await self._send([])
        await self._redis.aclose()
