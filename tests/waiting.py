"""The one way tests wait: for a condition, polled, with a deadline and a message that
says what did not happen. Never a bare sleep for an event a test could observe."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

_T = TypeVar("_T")

#: How long a test waits for something that normally happens within a second or two.
WITHIN_S = 20.0
_EVERY_S = 0.05


def wait_until(
    condition: Callable[[], _T], *, what: str, within_s: float = WITHIN_S, every_s: float = _EVERY_S
) -> _T:
    """Poll `condition` until it returns something truthy, and return that."""
    deadline = time.monotonic() + within_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        time.sleep(every_s)


async def async_wait_until(
    condition: Callable[[], _T | Awaitable[_T]],
    *,
    what: str,
    within_s: float = WITHIN_S,
    every_s: float = _EVERY_S,
) -> _T:
    """`wait_until` on an event loop; `condition` may be a coroutine function."""
    deadline = time.monotonic() + within_s
    while True:
        value = condition()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(every_s)
