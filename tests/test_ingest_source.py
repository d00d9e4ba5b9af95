"""The outbound window: announcements wait for PUBACKs instead of overrunning the broker."""

from __future__ import annotations

import asyncio

from ingest.source import OutboundWindow


def test_window_blocks_at_its_limit_and_reopens_on_puback() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        window = OutboundWindow(limit=2)
        window.push_message(1, b"a")
        await asyncio.wait_for(window.wait_for_room(), 0.1)
        window.push_message(2, b"b")
        waiter = asyncio.ensure_future(window.wait_for_room())
        await asyncio.sleep(0.05)
        blocked = not waiter.done()
        window.remove_message_by_mid(1)
        await asyncio.sleep(0)
        reopened = waiter.done()
        window.push_message(3, b"c")
        window.clear()  # a new clean session: nothing is in flight any more
        await asyncio.wait_for(window.wait_for_room(), 0.1)
        return blocked, reopened, window.is_empty

    assert asyncio.run(scenario()) == (True, True, True)
