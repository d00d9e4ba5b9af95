"""Group commit: a batch lingers for more readings while the store is busy, and while
the previous transaction started less than a linger ago."""

from __future__ import annotations

import asyncio

from meterproof.ingest.batcher import next_batch


async def _feed(queue: asyncio.Queue[int], items: range, every_s: float) -> None:
    for i in items:
        await asyncio.sleep(every_s)
        queue.put_nowait(i)


def test_a_free_store_takes_what_is_queued_at_once() -> None:
    async def scenario() -> tuple[list[int], float]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(3):
            queue.put_nowait(i)
        ready = asyncio.Event()
        ready.set()
        feeder = asyncio.create_task(_feed(queue, range(3, 10), 0.01))
        loop = asyncio.get_running_loop()
        began = loop.time()
        batch = await next_batch(queue, max_size=100, linger_s=1.0, ready=ready)
        feeder.cancel()
        return batch, loop.time() - began

    batch, took = asyncio.run(scenario())
    assert batch == [0, 1, 2]
    assert took < 0.5  # far from the 1 s linger


def test_a_busy_store_gathers_until_it_is_free_or_the_linger_ends() -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        ready = asyncio.Event()
        feeder = asyncio.create_task(_feed(queue, range(1000), 0.005))
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, ready.set)  # the transaction in flight ends
        until_free = await next_batch(queue, max_size=1000, linger_s=5.0, ready=ready)
        ready.clear()
        capped = await next_batch(queue, max_size=1000, linger_s=0.05)
        feeder.cancel()
        return until_free, capped

    until_free, capped = asyncio.run(scenario())
    assert 5 <= len(until_free) <= 40  # ~0.1 s of arrivals every 5 ms, not 5 s of them
    assert 3 <= len(capped) <= 20  # no `ready`: the 50 ms linger bounds it


def test_a_free_store_takes_no_second_transaction_within_the_linger() -> None:
    """A trickle: the store is free, but the previous transaction started just now, so the
    batch gathers until one linger after that start, not one reading per transaction."""

    async def scenario() -> tuple[list[int], float, list[int]]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        ready = asyncio.Event()
        ready.set()
        feeder = asyncio.create_task(_feed(queue, range(1000), 0.005))
        loop = asyncio.get_running_loop()
        began = loop.time()
        gathered = await next_batch(
            queue, max_size=1000, linger_s=5.0, ready=ready, not_before=began + 0.1
        )
        took = loop.time() - began
        # long past: the free store takes what is there at once
        at_once = await next_batch(queue, max_size=1000, linger_s=5.0, ready=ready)
        feeder.cancel()
        return gathered, took, at_once

    gathered, took, at_once = asyncio.run(scenario())
    assert 5 <= len(gathered) <= 40  # ~0.1 s of arrivals every 5 ms
    assert 0.09 <= took < 1.0  # until not_before, far from the 5 s linger
    assert len(at_once) <= 3


def test_the_linger_bounds_the_wait_for_not_before() -> None:
    async def scenario() -> float:
        queue: asyncio.Queue[int] = asyncio.Queue()
        queue.put_nowait(0)
        ready = asyncio.Event()
        ready.set()
        loop = asyncio.get_running_loop()
        began = loop.time()
        await next_batch(queue, max_size=10, linger_s=0.05, ready=ready, not_before=began + 10)
        return loop.time() - began

    assert asyncio.run(scenario()) < 1.0
