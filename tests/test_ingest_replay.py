"""The replay cache against a real Redis: what a batch remembers travels with a later
look-up, and nothing is lost to the cache's own buffering except what a cache may lose."""

from __future__ import annotations

import asyncio

from meterproof.ingest.replay import RedisReplayCache, same_reading
from meterproof.stack.redis import RedisServer

DIGEST = bytes(range(32))


def _holds(cached: bytes | None, digest: bytes) -> bool:
    return cached is not None and same_reading(cached, digest)


def test_what_is_remembered_is_found_by_the_next_lookup(redis_server: RedisServer) -> None:
    async def scenario() -> tuple[list[bytes | None], list[bytes | None]]:
        cache = RedisReplayCache(redis_server.url, ttl_s=60)
        try:
            await cache.remember([("replay-a", 1, DIGEST), ("replay-a", 2, DIGEST[::-1])])
            found = await cache.lookup([("replay-a", 1), ("replay-a", 3), ("replay-a", 2)])
        finally:
            await cache.close()
        # another worker's cache: the entries are in Redis, not in the first one's buffer
        other = RedisReplayCache(redis_server.url, ttl_s=60)
        try:
            seen = await other.lookup([("replay-a", 1)])
        finally:
            await other.close()
        return found, seen

    found, seen = asyncio.run(scenario())
    assert found[1] is None
    assert _holds(found[0], DIGEST)
    assert _holds(found[2], DIGEST[::-1])
    assert _holds(seen[0], DIGEST)


def test_close_sends_what_no_lookup_carried(redis_server: RedisServer) -> None:
    async def scenario() -> list[bytes | None]:
        cache = RedisReplayCache(redis_server.url, ttl_s=60)
        await cache.remember([("replay-b", 7, DIGEST)])
        await cache.close()
        other = RedisReplayCache(redis_server.url, ttl_s=60)
        try:
            return await other.lookup([("replay-b", 7)])
        finally:
            await other.close()

    found = asyncio.run(scenario())
    assert _holds(found[0], DIGEST)


def test_a_long_buffer_is_sent_without_waiting_for_a_lookup(redis_server: RedisServer) -> None:
    async def scenario() -> list[bytes | None]:
        cache = RedisReplayCache(redis_server.url, ttl_s=60)
        other = RedisReplayCache(redis_server.url, ttl_s=60)
        try:
            n = RedisReplayCache.PENDING_MAX + 1
            await cache.remember([("replay-c", i, DIGEST) for i in range(n)])
            return await other.lookup([("replay-c", 0), ("replay-c", n - 1)])
        finally:
            await other.close()
            await cache.close()

    assert all(v is not None for v in asyncio.run(scenario()))


def test_redis_down_costs_misses_not_errors(redis_server: RedisServer) -> None:
    async def scenario() -> list[bytes | None]:
        cache = RedisReplayCache(redis_server.url, ttl_s=60, timeout_s=0.2)
        try:
            await cache.remember([("replay-d", 1, DIGEST)])
            await asyncio.to_thread(redis_server.stop)
            try:
                return await cache.lookup([("replay-d", 1)])
            finally:
                await asyncio.to_thread(redis_server.start)
        finally:
            await cache.close()

    assert asyncio.run(scenario()) == [None]
