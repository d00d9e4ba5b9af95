"""Size- and time-bounded batches: a batch closes at `max_size` items or `linger_s` after
its first item, whichever comes first, so a quiet stream still commits promptly."""

from __future__ import annotations

import asyncio
from typing import TypeVar

T = TypeVar("T")


async def next_batch(queue: asyncio.Queue[T], *, max_size: int, linger_s: float) -> list[T]:
    """Wait for one item, then take what arrives within the linger time, up to max_size."""
    batch = [await queue.get()]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + linger_s
    while len(batch) < max_size:
        try:
            batch.append(queue.get_nowait())
            continue
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            batch.append(await asyncio.wait_for(queue.get(), remaining))
        except TimeoutError:
            break
    return batch
