"""The replay cache against a real Redis: what a batch remembers travels with a later
look-up, nothing is lost to the cache's own buffering except what a cache may lose, and
Redis is asked only about readings this worker may have seen."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from meterproof.ingest.replay import RedisReplayCache, same_reading
from meterproof.stack.redis import RedisServer

DIGEST = bytes(range(32))


def _holds(cached: bytes | None, digest: bytes) -> bool:
    return cached is not None and same_reading(cached, digest)


def _checks() -> tuple[float, float]:
    """(asked Redis, left to the database) so far, from the worker's counter."""
    redis, database = (
        REGISTRY.get_sample_value("meterproof_replay_checks_total", {"asked": asked}) or 0.0
        for asked in ("redis", "database")
    )
    return redis, database


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


def test_only_what_this_worker_may_have_seen_is_asked_about(redis_server: RedisServer) -> None:
    """Redis holds seq 2 and 5 of one meter and seq 9 of another (remembered by another
    worker). A meter seen for the first time is asked about; after seq 1, seq 5 is above
    the meter's mark, so Redis is not asked and the database will judge it; seq 2 is then
    below the mark (5), so it is asked about and found."""

    async def scenario(marks_max: int) -> list[bytes | None]:
        other = RedisReplayCache(redis_server.url, ttl_s=60)
        await other.remember(
            [("replay-e", 2, DIGEST), ("replay-e", 5, DIGEST), ("replay-f", 9, DIGEST)]
        )
        await other.close()
        cache = RedisReplayCache(redis_server.url, ttl_s=60, marks_max=marks_max)
        try:
            return [
                *await cache.lookup([("replay-e", 1), ("replay-f", 9)]),
                *await cache.lookup([("replay-e", 5)]),
                *await cache.lookup([("replay-e", 2)]),
            ]
        finally:
            await cache.close()

    redis, database = _checks()
    found = asyncio.run(scenario(marks_max=100))
    assert [_holds(v, DIGEST) for v in found] == [False, True, False, True]
    assert found[2] is None
    assert _checks() == (redis + 3, database + 1)
    # with no marks kept, every reading is asked about
    assert [_holds(v, DIGEST) for v in asyncio.run(scenario(marks_max=0))] == [
        False, True, True, True,
    ]  # fmt: skip


def test_past_marks_max_the_marks_start_again(redis_server: RedisServer) -> None:
    """Three meters' marks against a bound of two: the next look-up forgets them all, so
    seq 5 of the first meter, above its old mark, is asked about again and found."""

    async def scenario() -> list[bytes | None]:
        other = RedisReplayCache(redis_server.url, ttl_s=60)
        await other.remember([("replay-g", 5, DIGEST)])
        await other.close()
        cache = RedisReplayCache(redis_server.url, ttl_s=60, marks_max=2)
        try:
            await cache.lookup([("replay-g", 1), ("replay-h", 1), ("replay-i", 1)])
            return await cache.lookup([("replay-g", 5)])
        finally:
            await cache.close()

    assert _holds(asyncio.run(scenario())[0], DIGEST)


def test_remembered_entries_wait_for_a_lookup_at_most_a_while(redis_server: RedisServer) -> None:
    """Look-ups that ask Redis nothing do not carry the entries at once; the first call
    once the oldest has waited `REMEMBER_WITHIN_S` does - a look-up, or a remember."""
    wait_s = RedisReplayCache.REMEMBER_WITHIN_S

    async def in_redis(*keys: tuple[str, int]) -> list[bool]:
        other = RedisReplayCache(redis_server.url, ttl_s=60, marks_max=0)
        try:
            return [_holds(v, DIGEST) for v in await other.lookup(list(keys))]
        finally:
            await other.close()

    async def scenario() -> list[list[bool]]:
        cache = RedisReplayCache(redis_server.url, ttl_s=60)
        try:
            await cache.lookup([("replay-j", 1)])  # the meter is seen: its mark is 1
            await cache.remember([("replay-j", 1, DIGEST)])
            await cache.lookup([("replay-j", 2)])  # above the mark: nothing asked
            early = await in_redis(("replay-j", 1))
            await asyncio.sleep(wait_s)
            await cache.lookup([("replay-j", 3)])
            by_lookup = await in_redis(("replay-j", 1))
            await cache.remember([("replay-j", 2, DIGEST)])
            await cache.remember([])
            held = await in_redis(("replay-j", 2))
            await asyncio.sleep(wait_s)
            await cache.remember([("replay-j", 3, DIGEST)])
            by_remember = await in_redis(("replay-j", 2), ("replay-j", 3))
            return [early, by_lookup, held, by_remember]
        finally:
            await cache.close()

    assert asyncio.run(scenario()) == [[False], [True], [False], [True, True]]
