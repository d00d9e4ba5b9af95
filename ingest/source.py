"""The MQTT source: a persistent MQTT 5 session on the shared subscription, acknowledging
each message only when the worker says its outcome is committed.

Each QoS 1 PUBLISH becomes a `Delivery` handed synchronously to the worker, and `ack`
writes the PUBACKs of a committed batch in one write (why gmqtt's own delayed PUBACK is
not used: `ingest._gmqtt`). The bytes are framed by `ingest._wire`: a packet that breaks
the protocol is dropped, counted by reason (`meterproof_mqtt_packets_dropped_total`) and
logged, never raised into the event loop. A dropped QoS 1 PUBLISH stays in flight at the
broker, which validated its topic itself: only a broken broker or a forged stream gets
there.

A delivery that is never acknowledged (worker killed, batch not committed at shutdown) is
redelivered by the broker to the session on reconnect. A delivery from an earlier
connection is not acknowledged on a later one: the broker resends it there under the same
packet id, and only that copy's PUBACK is unambiguous (the id may be reused once
acknowledged). The broker's inflight window (`max_inflight_messages`, and
`receive_maximum` here) bounds how many deliveries are pending, which bounds the worker's
queue.

With several brokers (`Settings.brokers`, `stack up --ha`) the worker's source is a
`BrokerSet`: one `MqttSource` per broker, each with the shared subscription there, so
whichever broker a meter is on, some worker takes its readings. Each delivery names its
broker, and its PUBACK goes back on that broker's connection (same link rule as above).
A meter's receipts go to the broker its latest reading arrived on (after a failover, the
broker it moved to); verified readings and the integrators' copies go to every broker, so
a bridge or an integrator connected to any broker receives them.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import structlog
from gmqtt import Client, MQTTConnectError
from gmqtt.mqtt.constants import MQTTv50
from prometheus_client import Counter

from meterproof.backoff import Backoff
from meterproof.certs.layout import PkiLayout
from meterproof.certs.tls import client_context
from meterproof.errors import MeterproofError, UnavailableError
from meterproof.ingest import _gmqtt, _wire
from meterproof.ingest.records import Message
from meterproof.ingest.settings import IngestSettings
from meterproof.ingest.telemetry import BROKER_REFUSALS, PACKETS_DROPPED
from meterproof.schemas import topics
from meterproof.schemas.timestamps import wall_ms

log = structlog.get_logger("ingest.source")

BROKERS_SILENT = Counter(
    "meterproof_broker_silent",
    "Links cut because their broker answered nothing for broker_silent_s with the publish"
    " window full",
)
PUBLISHES_DROPPED = Counter(
    "meterproof_broker_down_publishes_dropped_total",
    "Receipts and verified copies not sent to a broker that was down with its window full"
    " (one of several brokers, or the only one when the worker stopped)",
)


#: CONNACK reason codes that no new attempt can change: this client, its identity or its
#: CONNECT is refused (MQTT 5: malformed packet, protocol error, unsupported protocol
#: version, client identifier not valid, bad user name or password, not authorized,
#: banned, bad authentication method, topic name invalid, packet too large, payload
#: format invalid, retain or QoS not supported; MQTT 3.1.1's 1, 2, 4 and 5, should gmqtt
#: fall back to it). Any other refusal (server unavailable or busy, quota or connection
#: rate exceeded, use another server, an unspecified error) may pass: tried again.
PERMANENT_REFUSALS: Final = frozenset(
    {1, 2, 4, 5, 0x81, 0x82, 0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C, 0x90, 0x95, 0x99, 0x9A, 0x9B}
)


class BrokerRefusedError(MeterproofError):
    """The broker answered the CONNECT with a refusal; `code` is its CONNACK reason code.
    A permanent one (`PERMANENT_REFUSALS`) needs an operator; any other, another try."""

    def __init__(self, broker: str, code: int) -> None:
        super().__init__(f"broker {broker} refused the connection: reason code {code:#04x}")
        self.code = code
        self.permanent = code in PERMANENT_REFUSALS
        self.exit_code = 1 if self.permanent else UnavailableError.exit_code


#: The backoff of what the source tries again by itself: a broker that failed the first
#: connection (`BrokerSet`), a refused subscription (`MqttSource`).
_RETRY_INITIAL_S: Final = 1.0
_RETRY_MAX_S: Final = 10.0
#: How long a connection attempt may take, TLS to CONNACK (and gmqtt's wait for the
#: broker to acknowledge the publishes sent again): gmqtt waits for a CONNACK for ever, so
#: a broker that took the connection and never answered held up a `BrokerSet`'s start.
_CONNECT_S: Final = 20.0
#: How long a stop waits for the broker to answer the TLS close before it cuts the link.
_CLOSE_S: Final = 2.0
#: The subscription as the logs show it: the group's name is a secret (a client that can
#: name it takes a share of the readings), and logs are read more widely than stack.env.
_SHOWN_TOPIC: Final = topics.shared("<share_group>", topics.READINGS_FILTER)


def _lasting_refusal(error: BaseException) -> int | None:
    """The reason code of a refusal no retry can change, None for any other failure."""
    return error.code if isinstance(error, BrokerRefusedError) and error.permanent else None


def _count_refusal(packet: str, code: int) -> None:
    BROKER_REFUSALS.labels(packet=packet, reason_code=f"{code:#04x}").inc()


@dataclass(frozen=True, slots=True)
class Delivery:
    """A PUBLISH as received, with what its PUBACK needs: the broker's packet id (None at
    QoS 0: nothing to acknowledge) and the connection it arrived on."""

    message: Message
    mid: int | None
    link: int
    #: Index of the broker it arrived from (in `Settings.brokers`); 0 with one broker.
    broker: int = 0


#: The worker's entry point: called synchronously for every delivery, in arrival order.
Handler = Callable[[Delivery], None]


class Source(Protocol):
    """Where a worker's messages come from and where its receipts and verified readings
    go; `MqttSource` in production, anything of this shape in a test."""

    @property
    def connected(self) -> bool:
        """Connected, and subscribed (or left, if asked to: `subscribe`)."""

    @property
    def refused(self) -> int | None:
        """The reason code with which a broker that is connected refuses the subscription
        now, else None: why a connected worker is not `connected`."""

    def subscribe(self, on: bool) -> None:
        """Take a share of the readings, or stop taking new ones (`ingest.follow`)."""

    async def start(self, deliver: Handler) -> None:
        """Begin delivering, in arrival order, to `deliver`; `OSError` when the broker
        cannot be reached, `BrokerRefusedError` when it refuses. A worker stopping before
        it returns cancels it."""

    async def stop(self) -> None:
        """No more deliveries and no more acknowledgements."""

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        """Acknowledge committed deliveries; returns how many were acknowledged."""

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Publish (topic, payload) pairs at QoS 1, in order."""


def _not_started(delivery: Delivery) -> None:
    raise RuntimeError("a delivery before MqttSource.start")


class MqttSource:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        client_id: str,
        share_group: str,
        session_expiry_s: int,
        receive_maximum: int,
        publish_window: int,
        silent_s: float,
        read_pause_s: float = 0.0,
        index: int = 0,
        subscribed: bool = True,
    ) -> None:
        """`index` is this broker's place in the list, stamped on every delivery;
        `silent_s`: see `publish_many`; `read_pause_s`: see `ingest._gmqtt.read_directly`;
        `subscribed`: see `subscribe`."""
        self.index = index
        self._silent_s = silent_s
        self._wanted = subscribed
        self._read_pause_s = read_pause_s
        self._host = host
        self._port = port
        self._tls = tls
        self._deliver: Handler = _not_started
        self._topic = topics.shared(share_group, topics.READINGS_FILTER)
        # clean_start=False from the very first connect: a v5 session first created with
        # clean start does not survive a broker restart on Mosquitto 2.0.
        self._window = _gmqtt.OutboundWindow(publish_window)
        self._client = Client(
            client_id,
            clean_session=False,
            persistent_storage=self._window,
            optimistic_acknowledgement=False,
            session_expiry_interval=session_expiry_s,
            receive_maximum=receive_maximum,
        )
        self._client.set_config({"reconnect_retries": -1, "reconnect_delay": 1})
        _gmqtt.take_over(self._client, on_publish=self._on_publish, on_puback=self._on_puback)
        _gmqtt.refusals_left_to_the_caller(
            self._client, until=lambda: self._link > 0, afterwards=self._refused_reconnect
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_unsubscribe = self._on_unsubscribe
        self._client.on_disconnect = self._on_disconnect
        self._link = 0
        self._link_up = False
        self._settled = asyncio.Event()  # SUBACK or UNSUBACK of what `_wanted` asks
        self._resubscribing = Backoff(_RETRY_INITIAL_S, _RETRY_MAX_S)
        self._resubscribe: asyncio.TimerHandle | None = None
        self._refused: int | None = None  # the SUBACK's refusal on this link (`refused`)

    @property
    def connected(self) -> bool:
        return self._settled.is_set()

    @property
    def refused(self) -> int | None:
        return self._refused

    def subscribe(self, on: bool) -> None:
        """Join or leave the shared subscription. After leaving, the connection stays: the
        deliveries the broker had already queued for this session still arrive, and are
        handled and acknowledged as any other (docs/scaling.md, "Load-following
        workers"), while new readings go to the workers still subscribed."""
        if on == self._wanted:
            return
        self._wanted = on
        if self._link_up:
            self._settled.clear()
            self._send_subscription()

    def _send_subscription(self) -> None:
        """SUBSCRIBE or UNSUBSCRIBE, as `_wanted` asks; it supersedes a retry still due.
        gmqtt keeps every subscription it is given, for ever: the one it has is sent again."""
        self._cancel_resubscribe()
        client = self._client
        if not self._wanted:
            client.unsubscribe(self._topic)
        elif client.subscriptions:
            client.resubscribe(client.subscriptions[0])
        else:
            client.subscribe(self._topic, qos=1)

    def _cancel_resubscribe(self) -> None:
        if self._resubscribe is not None:
            self._resubscribe.cancel()
            self._resubscribe = None

    async def start(self, deliver: Handler) -> None:
        """Connect; raises `OSError` when the broker cannot be reached or does not answer
        within `_CONNECT_S` and `BrokerRefusedError` when it refuses, each time with
        nothing left behind (no connection, and no retry of gmqtt's own: trying again is
        the caller's choice). Once connected, gmqtt re-establishes a lost link by itself."""
        self._deliver = deliver
        try:
            await asyncio.wait_for(
                self._client.connect(
                    self._host, self._port, ssl=self._tls, version=MQTTv50, keepalive=30
                ),
                _CONNECT_S,
            )
        except TimeoutError:
            await self.stop()
            raise TimeoutError(
                f"broker {self._host}:{self._port} did not answer within {_CONNECT_S:g} s"
            ) from None
        except MQTTConnectError as exc:
            await self.stop()
            code = _gmqtt.refusal_code(exc)
            _count_refusal("connack", code)
            raise BrokerRefusedError(f"{self._host}:{self._port}", code) from exc

    def _on_connect(self, client: Client, flags: int, rc: int, properties: Any) -> None:  # noqa: ANN401
        # A new link: deliveries of the previous one are redelivered on this one.
        self._link += 1
        link = self._link
        _gmqtt.read_directly(
            client,
            on_publish=lambda first, body: self._on_publish(first, body, link),
            on_puback=self._on_puback,
            on_broken=self._on_broken,
            pause_s=self._read_pause_s,
        )
        # The unacknowledged publishes go again whether the session was resumed or lost:
        # discarded, they were receipts and verified readings of committed batches.
        self._window.fit(_gmqtt.broker_receive_maximum(client))
        replayed = _gmqtt.replay_unacknowledged(client, self._window)
        # Subscribing again on a resumed session is harmless and covers a session the
        # broker lost (expired, or a broker without persistence); unsubscribing clears a
        # subscription the session kept from before this worker left.
        self._link_up = True
        self._send_subscription()
        log.info(
            "broker_connected",
            broker=f"{self._host}:{self._port}",
            topic=_SHOWN_TOPIC,
            session_present=bool(flags),
            replayed=replayed,
            subscribing=self._wanted,
        )

    def _on_subscribe(self, client: Client, mid: int, granted: Sequence[int], props: Any) -> None:  # noqa: ANN401
        refused = [code for code in granted if code >= 0x80]
        if refused:
            self._refused = refused[0]
            self._refused_subscription(refused)
            return
        self._refused = None
        self._resubscribing.reset()
        if self._wanted:
            self._settled.set()
        log.info("broker_subscribed", topic=_SHOWN_TOPIC)

    def _refused_subscription(self, codes: Sequence[int]) -> None:
        """Each refusal is counted and logged by reason code, and the SUBSCRIBE is sent
        again on this link with backoff: an operator may fix the broker's ACL meanwhile.
        It was sent again only on the next link, which never came to a broker that kept
        the connection: the worker stayed idle until `broker_lost_exit_s` ended it."""
        delay = self._resubscribing.next_s() if self._wanted else None  # or it left since
        for code in codes:
            _count_refusal("suback", code)
            log.error(
                "broker_refused_subscription",
                broker=f"{self._host}:{self._port}",
                topic=_SHOWN_TOPIC,
                reason_code=code,
                retry_in_s=None if delay is None else round(delay, 1),
            )
        if delay is not None:
            loop = asyncio.get_running_loop()
            self._resubscribe = loop.call_later(delay, self._send_subscription)

    def _refused_reconnect(self, code: int, retried: bool) -> None:
        """gmqtt's own reconnect was refused (it raises nothing then): counted and logged
        as a refused first connection is (`start`)."""
        _count_refusal("connack", code)
        log.error(
            "broker_refused_reconnect",
            broker=f"{self._host}:{self._port}",
            reason_code=code,
            retrying=retried,
        )

    def _on_unsubscribe(self, client: Client, mid: int, codes: Sequence[int]) -> None:
        # 0x11, "no subscription existed", is as good as a success here. A refusal leaves
        # this worker subscribed: it goes on taking readings, which loses nothing.
        if not self._wanted:
            self._settled.set()
        if any(code >= 0x80 for code in codes):
            log.error("broker_refused_unsubscribe", topic=_SHOWN_TOPIC, codes=list(codes))
        else:
            log.info("broker_unsubscribed", topic=_SHOWN_TOPIC, codes=list(codes))

    def _on_disconnect(self, client: Client, packet: Any, exc: Any = None) -> None:  # noqa: ANN401
        self._link_up = False
        self._refused = None
        self._settled.clear()
        self._cancel_resubscribe()
        log.warning(
            "broker_disconnected",
            broker=f"{self._host}:{self._port}",
            error=None if exc is None else str(exc),
        )

    def _on_publish(self, first: int, body: bytes, link: int | None = None) -> None:
        publish = _wire.parse_publish(first, body)
        if isinstance(publish, _wire.Drop):
            self._dropped(publish, first, len(body))
            return
        message = Message(publish.topic, publish.payload, wall_ms())
        link = self._link if link is None else link
        self._deliver(Delivery(message, publish.packet_id, link, self.index))

    def _on_puback(self, first: int, body: bytes) -> None:
        """The broker took one of our publishes: its id and its place in the window are free."""
        puback = _wire.parse_puback(first, body)
        if isinstance(puback, _wire.Drop):
            self._dropped(puback, first, len(body))
            return
        _gmqtt.free_packet_id(self._client, puback.packet_id)
        self._window.remove_message_by_mid(puback.packet_id)
        if puback.reason_code >= 0x80:
            log.error("broker_refused_publish", reason_code=puback.reason_code)

    def _on_broken(self, reason: _wire.Drop) -> None:
        PACKETS_DROPPED.labels(reason=reason.value).inc()
        log.error("mqtt_stream_broken", reason=reason.value, link=self._link)

    @staticmethod
    def _dropped(reason: _wire.Drop, first: int, size: int) -> None:
        PACKETS_DROPPED.labels(reason=reason.value).inc()
        log.error("mqtt_packet_dropped", reason=reason.value, first_byte=first, size=size)

    def _transport_write(self, data: bytes) -> bool:
        """Only once the current connection's CONNACK is handled: from a reconnect's
        CONNECT until then, gmqtt's connection is the new one while `_link` is still the
        old one's, and the broker resends the old link's deliveries before it reads what
        comes after the CONNECT, so an old delivery's PUBACK there acknowledges its id
        twice, the second time perhaps another message's. A publish not written stays in
        the window, which the CONNACK replays."""
        return self._link_up and _gmqtt.write_raw(self._client, data)

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        """PUBACK (success) every delivery of the current link in one write; call only once
        their outcomes are committed. Returns how many were acknowledged."""
        link = self._link
        acks = [
            _wire.puback_packet(d.mid) for d in deliveries if d.mid is not None and d.link == link
        ]
        if acks and self._transport_write(b"".join(acks)):
            return len(acks)
        return 0

    async def publish_many(
        self, items: Sequence[tuple[str, bytes]], *, drop_when_down: bool = False
    ) -> None:
        """QoS 1, within the outbound window, written in as few writes as the window allows;
        each packet is kept in the window's store and sent again at every CONNACK until the
        broker acknowledges it, also to a session the broker lost (`_on_connect`).

        A broker that answers nothing for `silent_s` while the window is full (its machine
        paused or cut off: no connection closes, so gmqtt's own close after two keepalives
        waits for good on the unsent bytes) has its link cut, and gmqtt connects again.

        `drop_when_down`: when the window is full and the broker is not connected, or falls
        silent, drop the rest instead of waiting (a `BrokerSet` must not stall every
        broker's receipts for one that is gone; the meters' republish covers a dropped
        receipt). Those not written when the wait for room is cancelled (a stopping
        worker) are dropped too."""
        chunk: list[bytes] = []
        for i, (topic, payload) in enumerate(items):
            if self._window.full:
                self._transport_write(b"".join(chunk))
                chunk = []
                if drop_when_down and not self.connected:
                    self._dropped_publishes(len(items) - i)
                    return
                try:
                    if not await self._room_unless_silent():
                        if drop_when_down:
                            self._dropped_publishes(len(items) - i)
                            return
                        await self._window.wait_for_room()
                except asyncio.CancelledError:
                    self._dropped_publishes(len(items) - i)
                    raise
            mid = _gmqtt.next_packet_id(self._client)
            packet = _wire.publish_packet(topic.encode(), payload, mid)
            self._window.push_message(mid, packet)
            chunk.append(packet)
        if chunk:
            self._transport_write(b"".join(chunk))

    async def _room_unless_silent(self) -> bool:
        """Wait for room in the window: True once there is; False, with the link cut, once
        the broker has sent nothing for `silent_s` since the wait began."""
        began = time.monotonic()
        while True:
            heard = max(began, _gmqtt.last_heard(self._client))
            left = heard + self._silent_s - time.monotonic()
            if left <= 0:
                BROKERS_SILENT.inc()
                log.error(
                    "broker_silent",
                    broker=f"{self._host}:{self._port}",
                    silent_s=self._silent_s,
                    window=self._window.limit,
                )
                _gmqtt.abort(self._client)
                return False
            try:
                await asyncio.wait_for(self._window.wait_for_room(), left)
            except TimeoutError:
                continue
            return True

    def _dropped_publishes(self, count: int) -> None:
        PUBLISHES_DROPPED.inc(count)
        log.warning(
            "broker_down_publishes_dropped", broker=f"{self._host}:{self._port}", count=count
        )

    async def stop(self) -> None:
        """A link that breaks while it closes (the TLS shutdown meets data the broker
        still sent) is closed all the same, and one whose broker does not answer the close
        within `_CLOSE_S` is cut (one that never sent its CONNACK held a stop for asyncio's
        30 s); anything unacknowledged is redelivered."""
        self._cancel_resubscribe()
        try:
            await asyncio.wait_for(self._client.disconnect(), _CLOSE_S)
        except TimeoutError:
            _gmqtt.abort(self._client)
            log.info("broker_link_cut_on_close", broker=f"{self._host}:{self._port}")
        except OSError as exc:
            log.info(
                "broker_link_broke_on_close", broker=f"{self._host}:{self._port}", error=str(exc)
            )


class BrokerSet:
    """A `Source` over one `MqttSource` per broker (see the module): deliveries from all,
    each acknowledged on its own broker, receipts to the meter's broker, the rest to all.

    A broker down when the worker starts is connected to in the background, with backoff,
    as soon as it is back; connected means at least one broker delivers.
    """

    def __init__(self, sources: Sequence[MqttSource]) -> None:
        if not sources:
            raise ValueError("a broker set needs at least one broker")
        self._sources = list(sources)
        #: meter id -> index of the broker its latest reading came from
        self._meter_broker: dict[str, int] = {}
        self._connecting: list[asyncio.Task[None]] = []

    @property
    def connected(self) -> bool:
        return any(source.connected for source in self._sources)

    @property
    def refused(self) -> int | None:
        return next((s.refused for s in self._sources if s.refused is not None), None)

    def subscribe(self, on: bool) -> None:
        for source in self._sources:
            source.subscribe(on)

    async def start(self, deliver: Handler) -> None:
        """Connect to every broker; raise only when none accepts (as `MqttSource`)."""

        def routed(delivery: Delivery) -> None:
            meter_id = topics.meter_of_readings(delivery.message.topic)
            if meter_id is not None:
                self._meter_broker[meter_id] = delivery.broker
            deliver(delivery)

        results = await asyncio.gather(
            *(source.start(routed) for source in self._sources), return_exceptions=True
        )
        failed = [(s, r) for s, r in zip(self._sources, results, strict=True) if r is not None]
        if len(failed) == len(self._sources):
            raise failed[0][1]
        for source, error in failed:
            if _lasting_refusal(error) is None:  # a lasting one: `_keep_trying` tells it
                log.warning("broker_unreachable_at_start", broker=source.index, error=str(error))
            self._connecting.append(asyncio.create_task(self._keep_trying(source, routed, error)))

    @staticmethod
    async def _keep_trying(source: MqttSource, deliver: Handler, error: BaseException) -> None:
        """Connect, with backoff, to a broker that failed the first time (`error`). A
        refusal no retry can change (this worker not authorised there, banned) needs an
        operator, yet is still tried (the ACL may be fixed meanwhile): a warning whenever
        its reason code first appears or changes, not at every attempt (each is counted,
        `MqttSource.start`). Any other failure is a debug line."""
        backoff = Backoff(_RETRY_INITIAL_S, _RETRY_MAX_S)
        told: int | None = None
        while True:
            refused = _lasting_refusal(error)
            if refused is not None and refused != told:
                log.warning(
                    "broker_refused_retrying",
                    broker=source.index,
                    reason_code=refused,
                    error=str(error),
                )
            told = refused
            await asyncio.sleep(backoff.next_s())
            try:
                await source.start(deliver)
            except (OSError, BrokerRefusedError) as exc:
                log.debug("broker_still_unreachable", broker=source.index, error=str(exc))
                error = exc
            else:
                return

    async def stop(self) -> None:
        for task in self._connecting:
            task.cancel()
        await asyncio.gather(*self._connecting, return_exceptions=True)
        await asyncio.gather(*(source.stop() for source in self._sources), return_exceptions=True)

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        by_broker: dict[int, list[Delivery]] = {}
        for delivery in deliveries:
            by_broker.setdefault(delivery.broker, []).append(delivery)
        return sum(self._sources[i].ack(batch) for i, batch in by_broker.items())

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Receipts (`meters/{id}/...`) to the broker of the meter's latest reading,
        everything else to every broker; a broker that is down never holds up the others."""
        per_broker: list[list[tuple[str, bytes]]] = [[] for _ in self._sources]
        for topic, payload in items:
            if topic.startswith(_METER_TOPICS):
                meter_id = topic.split("/", 2)[1]
                per_broker[self._meter_broker.get(meter_id, 0)].append((topic, payload))
            else:
                for each in per_broker:
                    each.append((topic, payload))
        await asyncio.gather(
            *(
                source.publish_many(batch, drop_when_down=True)
                for source, batch in zip(self._sources, per_broker, strict=True)
                if batch
            )
        )


#: Topics of one meter (its receipts) begin so: they go to that meter's broker only.
_METER_TOPICS = topics.of_meter("-").removesuffix("-/#")


def mqtt_source(settings: IngestSettings) -> MqttSource | BrokerSet:
    """The worker's source as its settings describe it: its own certificate (TLS 1.3);
    with several brokers, one connection to each (`BrokerSet`)."""
    pki = PkiLayout(settings.pki_root)
    identity = pki.service(settings.identity)
    sources = [
        MqttSource(
            host=host,
            port=port,
            tls=client_context(cert=identity.cert, key=identity.key, ca_cert=pki.ca_cert),
            client_id=settings.client_id,
            share_group=settings.share_group,
            session_expiry_s=settings.session_expiry_s,
            receive_maximum=settings.receive_maximum,
            publish_window=settings.publish_window,
            silent_s=settings.broker_silent_s,
            read_pause_s=settings.read_pause_ms / 1000,
            index=index,
            subscribed=not settings.follow_load,
        )
        for index, (host, port) in enumerate(settings.brokers())
    ]
    return sources[0] if len(sources) == 1 else BrokerSet(sources)
