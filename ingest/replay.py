"""The replay fast path: Redis remembers recently committed (meter_id, seq) -> hash.

It only ever *shortens* work: a hit with the same hash is a duplicate that needs no database
round trip (broker redeliveries, meters republishing unreceipted readings). A miss, a hit
with another hash, or Redis being down all fall through to the database, which is the
final judge. Entries are written only after commit and expire after `ttl_s`, which bounds
memory (~130 bytes a key: 20,000 meters at one reading per 5 s for 15 min is ~470 MB;
lower the TTL for bigger fleets - only the memory of recent redeliveries is lost).

Only a reading this worker may have seen is asked about: one of a meter it has not seen
since it started, or at or below the highest seq it has seen from that meter. Anything
above is new to this worker; another worker (a shared subscription spreads a meter's
readings) may have stored it, and then the database says so. Under live load almost every
reading is above its meter's mark, and every batch made a Redis round trip for nothing:
one per reading at a trickle (docs/scaling.md, "Redis asked only about what may be a
duplicate").

What a batch remembers is sent with a later batch's look-up, in one round trip, or on its
own once the oldest entry has waited `REMEMBER_WITHIN_S`. A duplicate that arrives before
its entry reached Redis is judged by the database, as on any miss.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final, Protocol

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from meterproof.ingest.telemetry import DEPENDENCY_ERRORS, REPLAY_CHECKS

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
    #: Entries wait at most this long for a look-up to carry them (checked at each call):
    #: a redelivery or a republish comes seconds later, after its receipt was missed.
    REMEMBER_WITHIN_S: Final = 1.0

    def __init__(
        self,
        url: str,
        *,
        ttl_s: int,
        marks_max: int = 1_000_000,
        timeout_s: float = 0.5,
        cooldown_s: float = 5.0,
    ) -> None:
        """`marks_max`: meters whose highest seq is kept (~140 bytes each); past it the
        marks start again from none. 0 keeps none, so every reading is asked about."""
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._ttl_s = ttl_s
        self._marks_max = marks_max
        self._marks: dict[str, int] = {}
        self._cooldown_s = cooldown_s
        self._down_until = 0.0
        self._pending_keys: list[str] = []
        self._pending_values: list[bytes] = []
        self._pending_since = 0.0

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

    def _may_have_seen(self, keys: Sequence[tuple[str, int]]) -> list[int]:
        """The positions of `keys` to ask Redis about, judged against the marks as they
        were before these keys (a meter first seen here is asked about whole); then raises
        the marks to what it saw."""
        if not self._marks_max:
            return list(range(len(keys)))
        if len(self._marks) > self._marks_max:
            self._marks.clear()
        marks = self._marks
        first_seen: set[str] = set()
        ask: list[int] = []
        for i, (meter_id, seq) in enumerate(keys):
            mark = marks.get(meter_id)
            if mark is None:
                first_seen.add(meter_id)
                marks[meter_id] = seq
                ask.append(i)
                continue
            if seq <= mark or meter_id in first_seen:
                ask.append(i)
            if seq > mark:
                marks[meter_id] = seq
        return ask

    def _overdue(self) -> bool:
        return bool(self._pending_keys) and (
            len(self._pending_keys) > self.PENDING_MAX
            or time.monotonic() - self._pending_since >= self.REMEMBER_WITHIN_S
        )

    async def lookup(self, keys: Sequence[tuple[str, int]]) -> list[bytes | None]:
        found: list[bytes | None] = [None] * len(keys)
        ask = self._may_have_seen(keys)
        REPLAY_CHECKS.labels(asked="redis").inc(len(ask))
        REPLAY_CHECKS.labels(asked="database").inc(len(keys) - len(ask))
        if ask or self._overdue():
            replies = await self._send([_key(*keys[i]) for i in ask])
            for i, reply in zip(ask, replies, strict=True):
                found[i] = reply
        return found

    async def remember(self, entries: Sequence[tuple[str, int, bytes]]) -> None:
        """Kept for a later look-up (see the module), or sent now if overdue."""
        if entries and not self._pending_keys:
            self._pending_since = time.monotonic()
        for meter_id, seq, digest in entries:
            self._pending_keys.append(_key(meter_id, seq))
            self._pending_values.append(digest[:_HASH_BYTES])
        if self._overdue():
            await self._send([])

    async def close(self) -> None:
        if self._pending_keys:
            await self._send([])
        await self._redis.aclose()
