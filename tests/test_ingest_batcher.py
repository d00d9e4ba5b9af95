"""Group commit: a batch lingers for more readings while the store is busy, and while
the previous transaction started less than a linger ago; it closes at once when full."""

from __future__ import annotations

import asyncio

from meterproof.ingest.batcher import Batcher


async def _feed(batcher: Batcher[int], items: range, every_s: float) -> None:
    for i in items:
        await asyncio.sleep(every_s)
        batcher.put(i)


def test_a_free_store_takes_what_is_queued_at_once() -> None:
    async def scenario() -> tuple[list[int], float]:
        batcher: Batcher[int] = Batcher(max_size=100, linger_s=1.0)
        for i in range(3):
            batcher.put(i)
        feeder = asyncio.create_task(_feed(batcher, range(3, 10), 0.01))
        loop = asyncio.get_running_loop()
        began = loop.time()
        batch = await batcher.next_batch()
        feeder.cancel()
        return batch, loop.time() - began

    batch, took = asyncio.run(scenario())
    assert batch == [0, 1, 2]
    assert took < 0.5  # far from the 1 s linger


def test_a_busy_store_gathers_until_it_is_free_or_the_linger_ends() -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        batcher: Batcher[int] = Batcher(max_size=1000, linger_s=0.5)
        batcher.store_busy()  # a transaction that will take longer than the linger
        await asyncio.sleep(0.45)
        feeder = asyncio.create_task(_feed(batcher, range(1000), 0.005))
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, batcher.store_free)  # it ends 0.05 s past its linger
        until_free = await batcher.next_batch()
        short: Batcher[int] = Batcher(max_size=1000, linger_s=0.05)
        short.store_busy()
        feeder.cancel()
        feeder = asyncio.create_task(_feed(short, range(1000), 0.005))
        capped = await short.next_batch()
        feeder.cancel()
        return until_free, capped

    until_free, capped = asyncio.run(scenario())
    assert 5 <= len(until_free) <= 40  # ~0.1 s of arrivals every 5 ms, not the 0.5 s linger's
    assert 3 <= len(capped) <= 20  # the store stays busy: the 50 ms linger bounds it


def test_a_free_store_takes_no_second_transaction_within_the_linger() -> None:
    """A trickle: the store is free, but the previous transaction started just now, so the
    batch gathers until one linger after that start, not one reading per transaction."""

    async def scenario() -> tuple[list[int], float, list[int]]:
        batcher: Batcher[int] = Batcher(max_size=1000, linger_s=0.1)
        loop = asyncio.get_running_loop()
        began = loop.time()
        batcher.store_busy()  # the previous batch went to the store just now
        batcher.store_free()  # and its transaction is already over
        feeder = asyncio.create_task(_feed(batcher, range(1000), 0.005))
        gathered = await batcher.next_batch()
        took = loop.time() - began
        # long past: the free store takes what is there at once
        at_once = await batcher.next_batch()
        feeder.cancel()
        return gathered, took, at_once

    gathered, took, at_once = asyncio.run(scenario())
    assert 5 <= len(gathered) <= 40  # ~0.1 s of arrivals every 5 ms
    assert 0.09 <= took < 1.0  # a linger after the previous batch, not its first reading
    assert len(at_once) <= 3


def test_the_linger_bounds_the_wait_for_a_busy_store() -> None:
    async def scenario() -> float:
        batcher: Batcher[int] = Batcher(max_size=10, linger_s=0.05)
        batcher.put(0)
        loop = asyncio.get_running_loop()
        began = loop.time()
        batcher.store_busy()  # and it stays busy
        await batcher.next_batch()
        return loop.time() - began

    assert asyncio.run(scenario()) < 1.0


def test_a_full_batch_closes_at_once_and_the_rest_waits_in_order() -> None:
    """The linger never holds a full batch: with a small `batch_max_size` a busy store
    would otherwise cap the rate at one batch per linger."""

    async def scenario() -> tuple[list[int], float, list[int], list[int]]:
        batcher: Batcher[int] = Batcher(max_size=4, linger_s=2.0)
        batcher.store_busy()
        feeder = asyncio.create_task(_feed(batcher, range(10), 0.01))
        loop = asyncio.get_running_loop()
        began = loop.time()
        first = await batcher.next_batch()
        took = loop.time() - began
        await feeder
        batcher.store_free()
        return first, took, await batcher.next_batch(), await batcher.next_batch()

    first, took, second, third = asyncio.run(scenario())
    assert first == [0, 1, 2, 3]
    assert took < 1.0  # the fourth reading closed it, not the 2 s linger
    assert second == [4, 5, 6, 7]
    assert third == [8, 9]
