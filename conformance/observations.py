"""What the kit saw of a meter, as plain values: the PUBLISHes it received, the broker's
connect and subscribe records, the receipts it sent, the connection attempts during the
outage. The checks judge these and nothing else, so they are tested without a broker.

Times are seconds on the kit's monotonic clock since the run began; `wall_ms` is the
wall clock at arrival, for judging a reading's `ts`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from meterproof.schemas.signatures import PublicKey

#: Mosquitto's protocol numbers in its connect log line: MQTT 3.1, 3.1.1 and 5.
PROTOCOLS: Final = {"p1": "3.1", "p2": "3.1.1", "p5": "5"}

_CONNECT: Final = re.compile(
    r"New client connected from \S+ as (?P<client>\S+) "
    r"\((?P<proto>p\d), c(?P<clean>[01]), k(?P<keepalive>\d+)(?:, u'(?P<user>[^']*)')?\)\.$"
)
# log_type subscribe: "<client id> <qos> <topic filter>"; client ids never hold spaces
# here (the broker replaces them by the certificate's CN).
_SUBSCRIBE: Final = re.compile(r"^(?P<client>\S+) (?P<qos>[012]) (?P<topic>\S+)$")


@dataclass(frozen=True, slots=True)
class Published:
    """One PUBLISH on the meter's readings topic, as the kit received it."""

    at_s: float
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    wall_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Connected:
    """A CONNECT the broker accepted, from its log."""

    at_s: float
    client_id: str
    protocol: str
    clean_start: bool
    keepalive_s: int


@dataclass(frozen=True, slots=True)
class Subscribed:
    at_s: float
    client_id: str
    topic: str
    qos: int


@dataclass(frozen=True, slots=True)
class ReceiptSent:
    at_s: float
    seq: int | None
    reading_hash: str | None
    status: str


@dataclass(frozen=True, slots=True)
class Window:
    start_s: float
    end_s: float

    def __contains__(self, at_s: object) -> bool:
        return isinstance(at_s, int | float) and self.start_s <= at_s <= self.end_s


@dataclass(slots=True)
class Observation:
    """Everything one run (or one capture) offers the checks.

    `silence`, `outage`, `power_cut` stay None when that phase did not run (a capture has neither);
    `live` is False for a capture, whose session behaviour cannot be seen."""

    meter_id: str | None
    key: PublicKey
    published: list[Published] = field(default_factory=list)
    live: bool = False
    connects: list[Connected] = field(default_factory=list)
    subscribes: list[Subscribed] = field(default_factory=list)
    receipts: list[ReceiptSent] = field(default_factory=list)
    silence: Window | None = None
    outage: Window | None = None
    #: receipts withheld from `start_s`, the meter killed at `end_s` and started again
    power_cut: Window | None = None
    #: connection attempts the kit's stand-in listener took during the outage
    attempts: list[float] = field(default_factory=list)
    #: how long after the outage the kit waited for the meter to come back
    reconnect_wait_s: float = 0.0
    #: readings of the meter the private stack's worker committed (None: a capture)
    stored: int | None = None


def parse_log_line(at_s: float, line: str) -> Connected | Subscribed | None:
    """A connect or subscribe record from one Mosquitto log line (timestamp prefix and
    all), else None. `at_s` is when the kit read it: the log's own stamps are whole
    seconds, too coarse for backoff."""
    _, sep, message = line.partition(": ")
    if not sep:
        return None
    message = message.strip()
    connect = _CONNECT.search(message)
    if connect is not None:
        return Connected(
            at_s,
            connect["client"],
            PROTOCOLS.get(connect["proto"], connect["proto"]),
            clean_start=connect["clean"] == "1",
            keepalive_s=int(connect["keepalive"]),
        )
    subscribe = _SUBSCRIBE.match(message)
    if subscribe is not None and "/" in subscribe["topic"]:
        return Subscribed(at_s, subscribe["client"], subscribe["topic"], int(subscribe["qos"]))
    return None
