"""Size- and time-bounded batches: a batch closes at `max_size` items, `linger_s` after its
first item, or once the store is free and the previous transaction started at least
`linger_s` ago, whichever comes first.

Lingering while the previous batch is still committing is group commit: a busy stream
gathers what arrives during a commit into the next (measured at 3,000 readings/s: p99
publish -> receipt 57 ms with a fixed 25 ms linger). The linger after the previous batch
bounds the transactions of a quiet stream as well: a transaction and what goes with it
(its round trips, the acknowledgement and publish writes, the Redis look-up, two thread
hand-offs) cost about 3.6 ms of server CPU whatever its size, and with the store free at
once a trickle of 1,000 readings/s made 4-10 readings per transaction (docs/scaling.md,
"Live path profile"). At most one transaction per linger and worker, for at most one
linger of added latency.

A lingering batch is woken only by what can close it: its deadline, the queue reaching
`max_size`, or the store becoming free. A reading that arrives meanwhile is appended and
wakes nobody; waking the batch for each one (an `asyncio.Queue` getter with a timeout per
reading) cost ~45 µs of CPU per reading at a trickle (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    """The worker's queue of received items; one consumer takes them batch by batch."""

    def __init__(self, *, max_size: int, linger_s: float) -> None:
        self._items: deque[T] = deque()
        self._max_size = max_size
        self._linger_s = linger_s
        self._store_free = True
        self._not_before = 0.0  # loop time: a linger after the last batch went to the store
        self._wanted = 1  # queue length that wakes the waiting consumer
        self._wake: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        self._items.append(item)
        if len(self._items) >= self._wanted:
            self._wake_consumer()

    def store_busy(self) -> None:
        """A batch went to the store: the next lingers while its transaction is in flight
        (group commit), and for at least a linger from now."""
        self._store_free = False
        self._not_before = asyncio.get_running_loop().time() + self._linger_s

    def store_free(self) -> None:
        self._store_free = True
        self._wake_consumer()

    def _wake_consumer(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _wait(self, wanted: int, timeout_s: float | None) -> None:
        self._wanted = wanted
        self._wake = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._wake, timeout_s)
        except TimeoutError:
            pass
        finally:
            self._wake = None
            self._wanted = 1

    async def next_batch(self) -> list[T]:
        """Wait for one item, then until the batch may close (the module's rules); take
        at most `max_size` items in arrival order."""
        while not self._items:
            await self._wait(1, None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._linger_s
        while len(self._items) < self._max_size:
            now = loop.time()
            if self._store_free and now >= self._not_before:
                break
            until = min(deadline, self._not_before) if self._store_free else deadline
            if until <= now:
                break
            await self._wait(self._max_size, until - now)
        return [self._items.popleft() for _ in range(min(self._max_size, len(self._items)))]
