"""`meterproof fuzz --target wire`: raw bytes, as a connection hands them over, through the
MQTT framing the worker reads itself (`ingest._wire`: the splitter, then PUBLISH and
PUBACK parsing). It is the first code that touches bytes from the network.

Invariants, per input:
1. Nothing escapes: no exception from the splitter or either parser.
2. The splitter loses and invents nothing: its packets, re-framed, are exactly the bytes
   it consumed; it breaks the stream (the link is lost) only at a Remaining Length that
   cannot be read; unless the stream is broken, what is left starts a packet still to
   come (split again, it yields nothing), and a reading's PUBLISH sent after the packets
   it consumed still comes through; the same bytes fed in three reads, as gmqtt's buffer
   grows, give the same packets.
3. A parsed PUBLISH has a non-empty topic without NUL or wildcards, a packet id exactly
   when its QoS needs one (never 0), and a payload that ends its body; one without
   properties re-encodes to the very bytes it came from.
4. A parsed PUBACK has a non-zero packet id and a reason code the specification allows.
Every drop is counted by reason; memory is sampled and each input's time bounded as in
the payload campaign.
"""

from __future__ import annotations

import base64
import random
import traceback
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

from hypothesis import strategies as st

from meterproof.fuzz.checker import Counting, InputClock
from meterproof.fuzz.engines import Progress, mutate
from meterproof.ingest import _wire as wire
from meterproof.ingest._wire import Drop, Puback, Publish

KINDS: Final = ("exception", "split", "publish", "puback", "timeout", "crash", "oom", "leak")
_WILDCARDS: Final = ("\x00", "+", "#")


@dataclass(frozen=True, slots=True)
class WireFailure:
    kind: str
    origin: str
    data: bytes
    detail: str

    def reproducer(self) -> str:
        return (
            f"[{self.kind}] from {self.origin}\n  bytes:   {self.data[:300]!r}"
            f"{' ...' if len(self.data) > 300 else ''}\n"
            f"  base64:  {base64.b64encode(self.data).decode()}\n"  # whole: it reproduces
            f"  {self.detail.strip()[-1500:]}"
        )

    def to_json(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "origin": self.origin,
            "data_b64": base64.b64encode(self.data).decode(),
            "detail": self.detail[-4000:],
        }

    @classmethod
    def from_json(cls, data: dict[str, str]) -> WireFailure:
        return cls(data["kind"], data["origin"], base64.b64decode(data["data_b64"]), data["detail"])


@dataclass(slots=True)
class WireTally:
    inputs: int = 0
    packets: Counter[str] = field(default_factory=Counter)  # publish, puback, other
    drops: Counter[str] = field(default_factory=Counter)  # by `Drop` value
    engines: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[WireFailure] = field(default_factory=list)

    def merge(self, other: dict[str, Any]) -> None:
        """Add a tally reported as JSON (by the atheris subprocess)."""
        self.inputs += int(other["inputs"])
        self.packets.update(other["packets"])
        self.drops.update(other["drops"])
        self.engines.update(other["engines"])
        self.failures.update(other["failures"])
        self.examples += [WireFailure.from_json(f) for f in other["examples"]]

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "packets": dict(sorted(self.packets.items())),
            "drops": dict(sorted(self.drops.items())),
            "engines": dict(self.engines),
            "failures": dict(self.failures),
            "examples": [f.to_json() for f in self.examples],
        }


def _framed(first: int, body: bytes) -> bytes:
    return bytes((first,)) + wire.encode_varint(len(body)) + body


def _publish_problem(first: int, body: bytes, publish: Publish) -> str | None:
    topic = publish.topic
    if not topic or any(c in topic for c in _WILDCARDS):
        return f"topic {topic!r} passed"
    qos = first >> 1 & 3
    if (publish.packet_id is None) != (qos == 0) or publish.packet_id == 0:
        return f"packet id {publish.packet_id} at QoS {qos}"
    if not body.endswith(publish.payload):
        return "the payload is not the end of the body"
    topic_end = 2 + len(topic.encode())
    plain = first == 0x32 and body[topic_end + 2] == 0  # QoS 1, no flags, no properties
    if plain and publish.packet_id is not None:
        again = wire.publish_packet(topic.encode(), publish.payload, publish.packet_id)
        if again != _framed(first, body):
            return "re-encoding gives other bytes"
    return None


def _puback_problem(first: int, puback: Puback) -> str | None:
    if first != wire.PUBACK or not puback.packet_id:
        return f"PUBACK {first:#x} with packet id {puback.packet_id}"
    if puback.reason_code not in wire.PUBACK_REASONS:
        return f"reason code {puback.reason_code:#x}"
    return None


class WireChecker(Counting[WireTally]):
    """Runs raw inputs through the framing and keeps the tally; `keep` reproducers per
    failure kind and origin are kept, every failure is counted."""

    def __init__(
        self,
        *,
        keep: int = 3,
        sample_every: int = 1_000,
        warmup: int = 2_000,
        clock: InputClock | None = None,
    ) -> None:
        super().__init__(
            WireTally(), keep=keep, sample_every=sample_every, warmup=warmup, clock=clock
        )

    def check(self, data: bytes, origin: str) -> bool:
        """True when every invariant held (a failure is counted and kept); raises
        `InputTimeout` (counted too) when the input ran past the clock's limit."""
        self._count(origin)
        timed_out = partial(self.fail, "timeout", origin, data)
        problem = self._timed(partial(self._problem, data), timed_out)
        if problem is None:
            return True
        kind, detail = problem
        self.fail(kind, origin, data, detail)
        return False

    def fail(self, kind: str, origin: str, data: bytes, detail: str) -> None:
        """Count `data` as a `kind` failure (and keep it): the checker's own findings, and
        the input libFuzzer stopped on in the atheris child."""
        self.tally.failures[kind] += 1
        if self._keeps(kind, origin):
            self.tally.examples.append(WireFailure(kind, origin, data, detail))

    def _problem(self, data: bytes) -> tuple[str, str] | None:
        try:
            return self._examine(data)
        except Exception:  # noqa: BLE001 - an escaped exception is the finding itself
            return "exception", traceback.format_exc()

    def _examine(self, data: bytes) -> tuple[str, str] | None:
        frames = wire.split(data)
        split_problem = _split_problem(data, frames)
        if split_problem is not None:
            return "split", split_problem
        if frames.broken is not None:
            self.tally.drops[frames.broken.value] += 1
        for first, body in frames.packets:
            kind = first & 0xF0
            if kind == wire.PUBLISH:
                publish = wire.parse_publish(first, body)
                if isinstance(publish, Drop):
                    self.tally.drops[publish.value] += 1
                    continue
                self.tally.packets["publish"] += 1
                problem = _publish_problem(first, body, publish)
                if problem is not None:
                    return "publish", problem
            elif kind == wire.PUBACK:
                puback = wire.parse_puback(first, body)
                if isinstance(puback, Drop):
                    self.tally.drops[puback.value] += 1
                    continue
                self.tally.packets["puback"] += 1
                problem = _puback_problem(first, puback)
                if problem is not None:
                    return "puback", problem
            else:
                self.tally.packets["other"] += 1
        return None


def _unreadable_length(header: bytes) -> bool:
    """Whether the Remaining Length that `header` starts with cannot be read (the only
    reason to lose the link): four bytes that each call for one more, or not the shortest
    form (a last byte of 0)."""
    for i, byte in enumerate(header[:4]):
        if byte < 0x80:
            return i > 0 and byte == 0
    return len(header) >= 4


def _link_problem(data: bytes, frames: wire.Frames) -> str | None:
    """The link is lost only at an unreadable length; kept, it goes on after these bytes."""
    if frames.broken is not None:
        if _unreadable_length(data[frames.consumed + 1 :]):
            return None
        return f"the link is lost ({frames.broken.value}) at a readable Remaining Length"
    if wire.split(data[frames.consumed :]) != wire.Frames([], 0):
        return "the rest holds a packet the first pass left"
    after = wire.split(data[: frames.consumed] + _READING)
    if after.packets != [*frames.packets, *wire.split(_READING).packets]:
        return "a well-formed PUBLISH after these packets does not come through"
    return None


def _split_problem(data: bytes, frames: wire.Frames) -> str | None:
    if not 0 <= frames.consumed <= len(data):
        return f"consumed {frames.consumed} of {len(data)} bytes"
    if b"".join(_framed(f, b) for f, b in frames.packets) != data[: frames.consumed]:
        return "the packets do not re-frame to the bytes consumed"
    link_problem = _link_problem(data, frames)
    if link_problem is not None:
        return link_problem
    cuts = sorted({len(data) // 3, len(data) * 2 // 3})
    buffer, packets = b"", []
    for start, stop in zip([0, *cuts], [*cuts, len(data)], strict=True):
        buffer += data[start:stop]
        part = wire.split(buffer)
        packets += part.packets
        if part.broken is not None:
            break
        buffer = buffer[part.consumed :]
    if packets != frames.packets:
        return "three reads give other packets than one"
    return None


# ---- inputs ---------------------------------------------------------------------------

#: Property identifiers of MQTT 5 (all of them: the parsers must refuse the wrong ones).
_PROPERTY_IDS: Final = (
    0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x11, 0x12, 0x13, 0x15, 0x16, 0x17, 0x18, 0x19,
    0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2A,
)  # fmt: skip
_TOPICS: Final = (
    b"meters/123e4567-e89b-12d3-a456-426614174000/readings", b"meters/m/readings", b"",
    b"meters/+/readings", b"#", b"a\x00b", b"\xff\xfe", b"\xed\xa0\x80", b"\xc0\xaf",
    b"meters/\xe2\x80\xae/readings", b"x" * 300,
)  # fmt: skip


def _string(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


_PAYLOAD: Final = (
    b'{"v":1,"meter_id":"123e4567-e89b-12d3-a456-426614174000","seq":1,'
    b'"ts":1767225600000,"import_wh":1,"export_wh":0,"alg":"EdDSA","sig":"' + b"A" * 86 + b'"}'
)
#: A reading's QoS 1 PUBLISH: after any whole packets, hostile or not, it still comes through.
_READING: Final = wire.publish_packet(_TOPICS[0], _PAYLOAD, 1)


def seed_streams() -> list[bytes]:
    """Well-formed streams of the shapes a worker sees, for mutation and for atheris."""
    reading = _PAYLOAD
    topic = _TOPICS[0]
    publish = _READING
    properties = b"\x01\x01" + b"\x0b\x05" + b"\x26" + _string(b"k") + _string(b"v")
    with_properties = _framed(
        0x3A, _string(topic) + b"\x00\x02" + bytes((len(properties),)) + properties + reading
    )
    qos0 = _framed(0x31, _string(topic) + b"\x00" + reading)
    pubacks = [
        wire.puback_packet(7),
        _framed(0x40, b"\x00\x07\x10"),
        _framed(0x40, b"\x00\x07\x87\x05\x1f" + _string(b"no")),
    ]
    other = [b"\xd0\x00", b"\x90\x04\x00\x01\x00\x01"]  # PINGRESP, SUBACK
    big = wire.publish_packet(topic, b"x" * 20_000, 3)  # a three-byte Remaining Length
    return [
        publish,
        with_properties,
        qos0,
        *pubacks,
        publish + pubacks[0] + with_properties + other[0],
        b"".join(other) + qos0 + publish[:40],
        big,
    ]


@st.composite
def _packet(draw: st.DrawFn) -> bytes:
    """One packet, near the protocol: the fields a parser checks, each maybe wrong."""
    kind = draw(st.sampled_from(("publish", "publish", "puback", "raw")))
    if kind == "raw":
        return draw(st.binary(max_size=64))
    if kind == "puback":
        first = draw(st.sampled_from((0x40, 0x40, 0x41, 0x42)))
        body = draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
        body += draw(st.sampled_from((b"", b"\x00", b"\x87", b"\x05", b"\x10\x00")))
    else:
        first = draw(st.integers(0x30, 0x3F))
        topic = draw(
            st.one_of(st.sampled_from(_TOPICS), st.text(max_size=40).map(str.encode), st.binary())
        )
        body = _string(topic)
        if first & 0x06 or draw(st.booleans()):
            body += draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
        props = b""
        for _ in range(draw(st.integers(0, 3))):
            props += bytes((draw(st.sampled_from(_PROPERTY_IDS)),))
            props += draw(st.binary(max_size=8))
        declared = draw(st.sampled_from((len(props), len(props), len(props) + 1, 200)))
        body += wire.encode_varint(declared) + props + draw(st.binary(max_size=40))
    length = max(0, len(body) + draw(st.sampled_from((0, 0, 0, 0, 1, -1, 128))))
    right = wire.encode_varint(length)
    non_minimal = bytes((length & 0x7F | 0x80, 0x00))
    header = draw(st.sampled_from((right, right, right, non_minimal, b"\xff\xff\xff\xff\x7f")))
    return bytes((first,)) + header + body


def _cut(packets: list[bytes], short_by: int) -> bytes:
    stream = b"".join(packets)
    return stream[: len(stream) - short_by]


def wire_streams() -> st.SearchStrategy[bytes]:
    """A few packets in a row, perhaps cut short, as one read from the connection."""
    return st.builds(
        _cut, st.lists(_packet(), min_size=1, max_size=4), st.sampled_from((0, 0, 0, 1, 3))
    )


def run_wire_mutations(
    checker: WireChecker, seeds: list[bytes], *, count: int, seed: int, progress: Progress
) -> None:
    rng = random.Random(seed)  # noqa: S311 - reproducible inputs, not secrets
    pairs = [("", s) for s in seeds]
    for i in range(count):
        data = bytearray(rng.choice(seeds))
        names = [mutate(rng, data, pairs) for _ in range(rng.choice((1, 1, 2, 3, 5)))]
        checker.check(bytes(data[:65_536]), f"mutate:{names[0]}")
        if (i + 1) % 5_000 == 0:
            progress()
