"""The outbound window, and the MQTT framing the worker reads and writes itself."""

from __future__ import annotations

import asyncio

import pytest

from meterproof.ingest.source import OutboundWindow, encode_varint, read_varint


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


@pytest.mark.parametrize("value", [0, 127, 128, 16_383, 16_384, 268_435_455])
def test_variable_byte_integers_round_trip_and_stop_where_they_end(value: int) -> None:
    encoded = encode_varint(value)
    assert read_varint(b"\x30" + encoded + b"rest", 1, 1 + len(encoded) + 4) == (
        value,
        1 + len(encoded),
    )
    assert read_varint(encoded[:-1], 0, len(encoded) - 1) is None  # bytes end inside it


def test_a_variable_byte_integer_longer_than_four_bytes_is_malformed() -> None:
    with pytest.raises(ValueError, match="four bytes"):
        read_varint(b"\x80\x80\x80\x80\x01", 0, 5)
