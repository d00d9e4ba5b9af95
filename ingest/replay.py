"""The replay fast path: Redis remembers recently committed (meter_id, seq) -> hash.

It only ever *shortens* work: a hit with the same hash is a duplicate that needs no database
round trip (broker redeliveries, meters republishing unreceipted readings). A miss, a hit
with another hash, or Redis being down all fall through to the database, which is the
final judge. Entries are written only after commit and expire after `ttl_s`, which bounds
memory (~130 bytes a key: 20,000 meters at one reading per 5 s for 15 min is ~470 MB;
lower the TTL for bigger fleets - only the memory of recent redeliveries is lost).
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

    def __init__(
        self, url: str, *, ttl_s: int, timeout_s: float = 0.5, cooldown_s: float = 5.0
    ) -> None:
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._ttl_s = ttl_s
        self._remember = self._redis.register_script(_REMEMBER)
        self._cooldown_s = cooldown_s
        self._down_until = 0.0

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: RedisError) -> None:
        DEPENDENCY_ERRORS.labels(dependency="redis").inc()
        log.warning("redis_unavailable", error=str(exc), retry_in_s=self._cooldown_s)
        self._down_until = time.monotonic() + self._cooldown_s

    async def lookup(self, keys: Sequence[tuple[str, int]]) -> list[bytes | None]:
        if not keys or not self._available():
            return [None] * len(keys)
        try:
            values = await self._redis.mget([_key(m, s) for m, s in keys])
        except RedisError as exc:
            self._failed(exc)
            return [None] * len(keys)
        return [v if isinstance(v, bytes) else None for v in values]

    async def remember(self, entries: Sequence[tuple[str, int, bytes]]) -> None:
        if not entries or not self._available():
            return
        keys = [_key(meter_id, seq) for meter_id, seq, _ in entries]
        values = [digest[:_HASH_BYTES] for _, _, digest in entries]
        try:
            await self._remember(keys=keys, args=[self._ttl_s, *values])
        except RedisError as exc:
            self._failed(exc)

    async def close(self) -> None:
        await self._redis.aclose()
