"""The reference meter: sign, keep in the outbox, publish at QoS 1, forget on receipt.

Order of effects for one reading (the design; a crash between any two steps is safe):

1. `SeqState.take()` writes the next seq to disk  -> a restart never reuses a nonce;
2. sign the reading;
3. `Outbox.add()` writes the payload to disk       -> a restart republishes it;
4. publish at QoS 1 on `meters/{id}/readings` when connected, within the in-flight and
   rate bounds (so a backlog uploads steadily instead of flooding);
5. PUBACK: the broker has it; the receipt timer starts;
6. the receipt on `meters/{id}/receipts` (same seq and reading_hash) deletes the file.
   No receipt in time: publish again (the ingest side deduplicates).

The MQTT session is persistent from the first connect (MQTT 5, `clean_start=False`,
a session expiry), so receipts sent while the meter is offline wait for it at the broker.
With several brokers (`Broker.others`) a lost broker sends the meter to the next one
(`meter.network.Link`); the receipts of readings taken by the lost broker come back as
`duplicate` once step 6's timer republishes them on the new one.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError

from meterproof.certs.layout import PkiLayout
from meterproof.config import BrokerAddress, Settings
from meterproof.meter.delivery import Delivery, TokenBucket
from meterproof.meter.identity import MeterIdentity, client_tls
from meterproof.meter.measurement import Measurement
from meterproof.meter.network import Link, Network
from meterproof.meter.outbox import Outbox, Pending
from meterproof.meter.state import SeqState
from meterproof.schemas import topics
from meterproof.schemas.codec import sign_reading
from meterproof.schemas.reading import Receipt, ReceiptStatus, SignedReading

log = structlog.get_logger("meter.client")

DEFAULT_SESSION_EXPIRY_S: Final = 86_400
DEFAULT_KEEPALIVE_S: Final = 30
#: MQTT 5 PUBACK reason: the broker accepted the message but no subscription matched it.
NO_MATCHING_SUBSCRIBERS: Final = 16


@dataclass(frozen=True, slots=True)
class Broker:
    """Where to connect, and the one CA certificate a client trusts (the operator root).

    `others` are the brokers to move to, in order, when this one is lost (they share its
    CA, CRL and ACL: `stack up --ha`); the outbox republishes what was not receipted.
    """

    host: str
    port: int
    ca_cert: Path
    others: tuple[BrokerAddress, ...] = ()

    @classmethod
    def from_env(cls, env: Settings) -> Broker:
        (host, port), *others = env.brokers()
        return cls(host, port, PkiLayout(env.pki_root).ca_cert, tuple(others))

    @property
    def addresses(self) -> tuple[BrokerAddress, ...]:
        return ((self.host, self.port), *self.others)


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Every knob with its default, checked when built so a bad value fails at start."""

    keepalive_s: int = DEFAULT_KEEPALIVE_S
    #: How long the broker keeps the session (and receipts for it) while the meter is away.
    session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S
    #: Republish a reading that has no receipt this long after its PUBACK; doubles per
    #: attempt up to `max_republish_after_s`.
    republish_after_s: float = 30.0
    max_republish_after_s: float = 600.0
    #: Retry a reading the broker routed to nobody (PUBACK reason 16) after this long;
    #: doubles per attempt up to `republish_after_s`.
    unrouted_retry_s: float = 1.0
    #: Readings handed to MQTT without a PUBACK yet (also paho's in-flight window).
    max_inflight: int = 10
    #: Publishes per second, first sends and republishes alike; bursts up to max_inflight.
    publish_rate: float = 20.0
    #: fsync state and outbox writes (power-cut safe); off, they survive a process crash.
    durable: bool = True
    #: Seqs reserved per state write (see `SeqState`): 1 persists before every reading.
    seq_block: int = 1
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.keepalive_s < 5:
            raise ValueError(f"keepalive_s must be at least 5, not {self.keepalive_s}")
        if self.session_expiry_s < 1:
            raise ValueError("session_expiry_s must be at least 1: the session must outlive a drop")
        if self.seq_block < 1:
            raise ValueError(f"seq_block must be at least 1, not {self.seq_block}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        self.delivery()  # validates the delivery bounds

    def delivery(self) -> Delivery:
        return Delivery(
            republish_after=self.republish_after_s,
            max_republish_after=self.max_republish_after_s,
            max_inflight=self.max_inflight,
            bucket=TokenBucket(rate=self.publish_rate, burst=self.max_inflight),
            unrouted_retry=min(self.unrouted_retry_s, self.republish_after_s),
        )


@dataclass(slots=True)
class ClientStats:
    """Plain counters; a reading counts once in accepted/duplicate/rejected (first receipt)."""

    submitted: int = 0
    published: int = 0
    republished: int = 0
    #: PUBACKs: the broker took the reading (`unrouted` of them: nobody subscribed yet)
    acknowledged: int = 0
    unrouted: int = 0
    refused: int = 0
    accepted: int = 0
    duplicate: int = 0
    #: by reason code; "unspecified" if a worker sent a rejection without one
    rejected: Counter[str] = field(default_factory=Counter)

    @property
    def receipted(self) -> int:
        return self.accepted + self.duplicate + self.rejected.total()


ReceiptHook = Callable[[Pending, Receipt], None]


class MeterClient:
    """One meter on a `Network`. Call its methods on the network's loop thread only."""

    def __init__(
        self,
        identity: MeterIdentity,
        *,
        broker: Broker,
        state_dir: Path,
        network: Network,
        settings: ClientSettings | None = None,
        on_receipt: ReceiptHook | None = None,
    ) -> None:
        self.identity = identity
        self.meter_id = identity.meter_id
        self.broker = broker
        self.settings = settings or ClientSettings()
        self.network = network
        self.stats = ClientStats()
        self._on_receipt = on_receipt
        self._state = SeqState(
            state_dir / "state.json", durable=self.settings.durable, block=self.settings.seq_block
        )
        self._outbox = Outbox(
            state_dir / "outbox", meter_id=self.meter_id, durable=self.settings.durable
        )
        newest = self._outbox.max_seq()
        if newest is not None:
            self._state.advance_past(newest)  # even if the state file was lost
        self._delivery = self.settings.delivery()
        for entry in self._outbox:
            self._delivery.add(entry.seq)
        self._mids: dict[int, int] = {}
        self._link: Link | None = None
        self._drained = asyncio.Event()
        if not self._outbox:
            self._drained.set()

    @property
    def pending(self) -> int:
        """Readings still waiting for their receipt (on disk in the outbox)."""
        return len(self._outbox)

    def is_pending(self, seq: int) -> bool:
        return self._outbox.get(seq) is not None

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.is_up

    @property
    def on_broker(self) -> BrokerAddress | None:
        """The broker the meter is on (or tries next); None before `start`."""
        return None if self._link is None else self._link.broker

    def start(self) -> None:
        """Begin connecting; readings submitted meanwhile wait in the outbox."""
        if self._link is not None:
            raise RuntimeError(f"meter {self.meter_id} is already started")
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.meter_id, protocol=mqtt.MQTTv5
        )
        files = self.identity.files
        client.tls_set_context(
            client_tls(ca_cert=self.broker.ca_cert, cert=files.cert, key=files.key)
        )
        client.max_inflight_messages_set(self.settings.max_inflight)
        client.on_message = self._message
        client.on_publish = self._published
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.settings.session_expiry_s
        self._link = self.network.open(
            client,
            name=self.meter_id,
            brokers=self.broker.addresses,
            listener=self,
            keepalive=self.settings.keepalive_s,
            properties=properties,
            reconnect_min_s=self.settings.reconnect_min_s,
            reconnect_max_s=self.settings.reconnect_max_s,
        )

    def reserve_seq(self) -> int:
        """A fresh seq, already recorded as used on disk."""
        return self._state.take()

    def sign(self, seq: int, measurement: Measurement) -> SignedReading:
        fields = {"meter_id": self.meter_id, "seq": seq, **measurement.fields()}
        return sign_reading(fields, self.identity.key)

    def submit(self, measurement: Measurement) -> SignedReading:
        """Take a seq, sign, store in the outbox and publish: the normal path."""
        reading = self.sign(self.reserve_seq(), measurement)
        self.send(reading)
        return reading

    def send(self, reading: SignedReading) -> Pending:
        """Store and publish an already signed reading (the simulator crafts bad ones)."""
        entry = self._outbox.add(reading)
        self._drained.clear()
        self._delivery.add(entry.seq)
        self.stats.submitted += 1
        self._pump(time.monotonic())
        return entry

    async def drain(self) -> None:
        """Return once every reading has its receipt; bound it with `asyncio.timeout`."""
        await self._drained.wait()

    async def stop(self, *, graceful: bool = True) -> None:
        """Graceful sends DISCONNECT; otherwise the socket just drops, like a power cut."""
        if self._link is not None:
            await self._link.close(graceful=graceful)

    # LinkListener: called by the link on the loop thread.

    def link_up(self, *, session_present: bool) -> None:
        if self._link is None:
            return
        # Also with a session present: cheap, and a broker that lost it lost this too.
        self._link.client.subscribe(topics.receipts(self.meter_id), qos=1)
        log.debug("meter.connected", meter_id=self.meter_id, session_present=session_present)
        self._pump(time.monotonic())

    def link_down(self) -> None:
        """Nothing to do: paho resends in-flight messages, the outbox keeps the rest."""

    def tick(self, now: float) -> None:
        overdue = self._delivery.expire(now)
        if overdue:
            log.info(
                "meter.republish", meter_id=self.meter_id, count=len(overdue), first=overdue[0]
            )
        self._pump(now)

    def _pump(self, now: float) -> None:
        if self._link is None or not self._link.is_up:
            return
        for seq in self._delivery.take(now):
            entry = self._outbox.get(seq)
            if entry is None:
                continue
            info = self._link.client.publish(topics.readings(self.meter_id), entry.payload, qos=1)
            self._mids[info.mid] = seq
            if self._delivery.attempts(seq) > 1:
                self.stats.republished += 1
            else:
                self.stats.published += 1

    def _published(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        seq = self._mids.pop(mid, None)
        if seq is None:
            return
        self.stats.acknowledged += 1
        if reason.is_failure:
            # e.g. 135 not authorized: the broker dropped it; the receipt timer retries.
            self.stats.refused += 1
            log.error("meter.publish_refused", meter_id=self.meter_id, seq=seq, reason=str(reason))
        routed = reason.value != NO_MATCHING_SUBSCRIBERS
        if not routed:
            self.stats.unrouted += 1
            log.info("meter.publish_unrouted", meter_id=self.meter_id, seq=seq)
        now = time.monotonic()
        self._delivery.acked(seq, now, routed=routed)
        self._pump(now)

    def _message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            receipt = Receipt.model_validate_json(message.payload)
        except ValidationError as exc:
            log.warning("meter.bad_receipt", meter_id=self.meter_id, error=exc.errors()[0]["msg"])
            return
        self._settle(receipt)

    def _settle(self, receipt: Receipt) -> None:
        if receipt.seq is None or receipt.reading_hash is None:
            log.warning(
                "meter.receipt_unparsed_payload",
                meter_id=self.meter_id,
                status=receipt.status.value,
                reason=receipt.reason and receipt.reason.value,
            )
            return
        entry = self._outbox.settle(receipt.seq, receipt.reading_hash)
        if entry is None:
            return  # a later receipt for a republished copy, or for another reading
        self._delivery.settled(entry.seq)
        if receipt.status is ReceiptStatus.ACCEPTED:
            self.stats.accepted += 1
        elif receipt.status is ReceiptStatus.DUPLICATE:
            self.stats.duplicate += 1
        else:
            reason = receipt.reason.value if receipt.reason else "unspecified"
            self.stats.rejected[reason] += 1
            log.warning(
                "meter.reading_rejected",
                meter_id=self.meter_id,
                seq=entry.seq,
                reading_hash=entry.reading_hash,
                reason=reason,
            )
        if not self._outbox:
            self._drained.set()
        if self._on_receipt is not None:
            self._on_receipt(entry, receipt)
