"""The MQTT framing the worker reads and writes itself (`ingest._wire`), packet by packet,
then fuzzed with arbitrary bytes: nothing the network sends may raise."""

from __future__ import annotations

import functools
import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterproof.ingest import _wire as wire
from meterproof.ingest._wire import Drop, Puback, Publish
from meterproof.ingest.source import Delivery, MqttSource
from meterproof.ingest.telemetry import PACKETS_DROPPED

TOPIC = "meters/m-1/readings"


def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def _body(
    topic: str | bytes = TOPIC,
    packet_id: int | None = 7,
    properties: bytes = b"",
    payload: bytes = b"{}",
) -> bytes:
    mid = b"" if packet_id is None else struct.pack("!H", packet_id)
    return _str(topic) + mid + wire.encode_varint(len(properties)) + properties + payload


# ---- PUBLISH -------------------------------------------------------------------------


def test_a_publish_round_trips_through_the_splitter_and_the_parser() -> None:
    packet = wire.publish_packet(TOPIC.encode(), b'{"seq":1}', 513)
    frames = wire.split(packet)
    assert frames == wire.Frames([(0x32, packet[2:])], len(packet))
    assert wire.parse_publish(*frames.packets[0]) == Publish(TOPIC, 513, b'{"seq":1}')


def test_qos0_has_no_packet_id_and_dup_at_qos1_is_fine() -> None:
    assert wire.parse_publish(0x30, _body(packet_id=None)) == Publish(TOPIC, None, b"{}")
    assert wire.parse_publish(0x3B, _body()) == Publish(TOPIC, 7, b"{}")  # DUP, QoS 1, RETAIN


@pytest.mark.parametrize(
    ("first", "why"),
    [(0x36, "QoS 3"), (0x34, "QoS 2: never subscribed to"), (0x38, "DUP at QoS 0")],
)
def test_forbidden_flags_are_dropped(first: int, why: str) -> None:
    assert wire.parse_publish(first, _body(packet_id=None)) is Drop.FLAGS, why


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", Drop.TRUNCATED),
        (b"\x00", Drop.TRUNCATED),
        (b"\x00\x09meters/", Drop.TRUNCATED),  # topic longer than the packet
        (_str(TOPIC) + b"\x00", Drop.TRUNCATED),  # half a packet id
        (_str(TOPIC) + b"\x00\x07", Drop.TRUNCATED),  # no property length
        (_body(packet_id=0), Drop.PACKET_ID),
        (_body(topic=b""), Drop.TOPIC),  # would need a topic alias, never offered
        (_body(topic="meters/a\x00b/readings"), Drop.TOPIC),
        (_body(topic="meters/+/readings"), Drop.TOPIC),
        (_body(topic="meters/#"), Drop.TOPIC),
        (_body(topic=b"meters/\xff/readings"), Drop.TOPIC_UTF8),
        (_body(topic=b"meters/\xed\xa0\x80/readings"), Drop.TOPIC_UTF8),  # a surrogate
        (_body(topic=b"meters/\xc0\xaf/readings"), Drop.TOPIC_UTF8),  # overlong "/"
    ],
)
def test_a_malformed_publish_is_dropped_with_its_reason(body: bytes, reason: Drop) -> None:
    assert wire.parse_publish(0x32, body) is reason


def test_properties_are_walked_and_skipped() -> None:
    properties = (
        b"\x01\x01"  # Payload Format Indicator: UTF-8
        + b"\x02\x00\x00\x00\x3c"  # Message Expiry Interval
        + b"\x03" + _str("application/json")  # Content Type
        + b"\x08" + _str("reply/here")  # Response Topic
        + b"\x09" + _str(b"\x00\xff")  # Correlation Data: binary, NUL allowed
        + b"\x0b\x81\x01"  # Subscription Identifier 129
        + b"\x0b\x02"  # ... which may repeat
        + b"\x26" + _str("k") + _str("v")  # User Property
        + b"\x26" + _str("k") + _str("w")  # ... which may repeat
    )  # fmt: skip
    assert wire.parse_publish(0x32, _body(properties=properties, payload=b"P")) == Publish(
        TOPIC, 7, b"P"
    )


@pytest.mark.parametrize(
    "properties",
    [
        b"\x23\x00\x01",  # Topic Alias: no Topic Alias Maximum was offered
        b"\x7f\x00",  # no such property
        b"\x1f" + _str("reason"),  # Reason String: a PUBACK property, not a PUBLISH one
        b"\x01\x01\x01\x00",  # Payload Format Indicator twice
        b"\x01\x02",  # Payload Format Indicator is 0 or 1
        b"\x02\x00\x00",  # a four-byte integer cut short
        b"\x0b\x00",  # Subscription Identifier 0
        b"\x0b\x80",  # Subscription Identifier cut short
        b"\x0b\x80\x80\x80\x80\x01",  # Subscription Identifier over four bytes
        b"\x03" + _str(b"\xff"),  # Content Type not UTF-8
        b"\x03" + _str("a\x00"),  # Content Type with NUL
        b"\x26" + _str("k"),  # User Property without its value
        b"\x08\x00\x05ab",  # Response Topic longer than the properties
    ],
)
def test_a_bad_property_is_dropped(properties: bytes) -> None:
    assert wire.parse_publish(0x32, _body(properties=properties)) is Drop.PROPERTIES


def test_a_property_length_past_the_packet_is_dropped() -> None:
    body = _str(TOPIC) + b"\x00\x07" + b"\x05\x01\x01"  # says 5 bytes, 2 follow
    assert wire.parse_publish(0x32, body) is Drop.PROPERTIES
    non_minimal = _str(TOPIC) + b"\x00\x07" + b"\x80\x00"
    assert wire.parse_publish(0x32, non_minimal) is Drop.PROPERTIES
    cut = _str(TOPIC) + b"\x00\x07" + b"\x80"
    assert wire.parse_publish(0x32, cut) is Drop.TRUNCATED


# ---- PUBACK --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\x01\x02", Puback(258, 0)),  # the short form: success
        (b"\x01\x02\x10", Puback(258, 0x10)),  # no matching subscribers
        (b"\x01\x02\x87\x00", Puback(258, 0x87)),  # not authorized, empty properties
        (b"\x01\x02\x87\x05\x1f" + _str("no"), Puback(258, 0x87)),  # with a Reason String
        (b"\x01", Drop.TRUNCATED),
        (b"\x00\x00", Drop.PACKET_ID),
        (b"\x01\x02\x05", Drop.REASON),  # not a PUBACK reason code
        (b"\x01\x02\x00\x02\x01\x01", Drop.PROPERTIES),  # a PUBLISH property
        (b"\x01\x02\x00\x00\xff", Drop.PROPERTIES),  # bytes after the properties
        (b"\x01\x02\x00\x09\x1f", Drop.PROPERTIES),  # properties past the packet
    ],
)
def test_pubacks(body: bytes, expected: Puback | Drop) -> None:
    assert wire.parse_puback(wire.PUBACK, body) == expected


def test_a_puback_with_flags_is_dropped() -> None:
    assert wire.parse_puback(0x42, b"\x01\x02") is Drop.FLAGS


def test_the_short_puback_is_what_the_parser_reads() -> None:
    packet = wire.puback_packet(65535)
    frames = wire.split(packet)
    assert wire.parse_puback(*frames.packets[0]) == Puback(65535, 0)


# ---- splitting and the variable byte integer -------------------------------------------


def test_the_splitter_takes_whole_packets_and_waits_for_the_rest() -> None:
    one = wire.publish_packet(b"a/b", b"x" * 200, 1)  # a two-byte Remaining Length
    two = wire.puback_packet(9)
    data = one + two + one[:50]
    frames = wire.split(data)
    assert [first for first, _ in frames.packets] == [0x32, 0x40]
    assert frames.consumed == len(one) + len(two)
    assert frames.broken is None
    assert wire.split(b"\x32") == wire.Frames([], 0)  # not even a length yet
    assert wire.split(b"\x32\xc8") == wire.Frames([], 0)  # a length that goes on


@pytest.mark.parametrize(
    "length", [b"\x80\x80\x80\x80\x01", b"\x80\x00", b"\xff\x80\x00", b"\x80\x80\x80\x00"]
)
def test_a_malformed_remaining_length_breaks_the_stream_where_it_starts(length: bytes) -> None:
    good = wire.puback_packet(1)
    frames = wire.split(good + b"\x30" + length + b"rest")
    assert frames.packets == [(0x40, b"\x00\x01")]
    assert frames.consumed == len(good)
    assert frames.broken is Drop.LENGTH


@pytest.mark.parametrize("value", [0, 127, 128, 16_383, 16_384, 2_097_151, 268_435_455])
def test_variable_byte_integers_round_trip_and_stop_where_they_end(value: int) -> None:
    encoded = wire.encode_varint(value)
    assert wire.read_varint(b"\x30" + encoded + b"rest", 1, 1 + len(encoded) + 4) == (
        value,
        1 + len(encoded),
    )
    assert wire.read_varint(encoded[:-1], 0, len(encoded) - 1) is None  # bytes end inside it
    if value < 70_000:  # a whole packet, through each path of the splitter
        assert wire.split(b"\x30" + encoded + bytes(value)).packets == [(0x30, bytes(value))]


def test_a_value_that_does_not_fit_is_refused_when_encoding() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        wire.encode_varint(1 << 28)


# ---- fuzzed: arbitrary bytes ----------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=3_000, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_are_split_without_raising_and_nothing_is_lost(data: bytes) -> None:
    frames = wire.split(data)
    assert 0 <= frames.consumed <= len(data)
    rebuilt = b"".join(
        bytes([first]) + wire.encode_varint(len(body)) + body for first, body in frames.packets
    )
    if frames.broken is None:
        # What is left is the start of a packet: it waits, consumes nothing.
        assert wire.split(data[frames.consumed :]) == wire.Frames([], 0)
    assert rebuilt == data[: frames.consumed]  # only shortest lengths pass


@pytest.mark.slow
@settings(max_examples=3_000, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=300))
def test_any_body_parses_or_drops_and_never_raises(first: int, body: bytes) -> None:
    assert isinstance(wire.parse_publish(first, body), Publish | Drop)
    assert isinstance(wire.parse_puback(first, body), Puback | Drop)


_topic_text = st.text(
    st.characters(blacklist_characters="\x00+#", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=80,
)


@pytest.mark.slow
@settings(max_examples=1_000, deadline=None)
@given(_topic_text, st.integers(1, 65535), st.binary(max_size=20_000), st.data())
def test_well_formed_publishes_survive_any_cut_of_the_stream(
    topic: str, packet_id: int, payload: bytes, data: st.DataObject
) -> None:
    """As gmqtt feeds it: a buffer that grows read by read, minus what was consumed."""
    packet = wire.publish_packet(topic.encode(), payload, packet_id)
    stream = packet + wire.puback_packet(packet_id) + packet
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    buffer, got = b"", []
    for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        buffer += stream[start:stop]
        frames = wire.split(buffer)
        assert frames.broken is None
        got += frames.packets
        buffer = buffer[frames.consumed :]
    assert buffer == b""
    parsed = [
        wire.parse_publish(f, b) if f & 0xF0 == wire.PUBLISH else wire.parse_puback(f, b)
        for f, b in got
    ]
    publish = Publish(topic, packet_id, payload)
    assert parsed == [publish, Puback(packet_id, 0), publish]


@functools.cache
def _source() -> tuple[MqttSource, list[Delivery]]:
    """A source that never connects, delivering into a list (what `start` would set)."""
    deliveries: list[Delivery] = []
    source = MqttSource(
        host="127.0.0.1", port=1, tls=ssl.create_default_context(), client_id="wire-test",
        share_group="g", session_expiry_s=60, receive_maximum=20, publish_window=1, silent_s=10,
    )  # fmt: skip
    source._deliver = deliveries.append
    return source, deliveries


@pytest.mark.slow
@settings(max_examples=2_000, deadline=None)
@given(st.integers(0x30, 0x3F), st.binary(max_size=200))
def test_the_source_delivers_or_counts_every_publish(first: int, body: bytes) -> None:
    """What the source does with each PUBLISH the splitter hands it: a delivery, or one
    more in the dropped counter under the parser's reason."""
    source, deliveries = _source()
    deliveries.clear()
    outcome = wire.parse_publish(first, body)
    counted = {d: PACKETS_DROPPED.labels(reason=d.value)._value.get() for d in Drop}
    source._on_publish(first, body, link=1)
    after = {d: PACKETS_DROPPED.labels(reason=d.value)._value.get() for d in Drop}
    if isinstance(outcome, Drop):
        assert deliveries == []
        assert {d: after[d] - counted[d] for d in Drop if after[d] != counted[d]} == {outcome: 1}
    else:
        assert after == counted
        assert [(d.message.topic, d.mid, d.message.payload) for d in deliveries] == [outcome]
