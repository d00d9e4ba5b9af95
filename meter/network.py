"""Many paho clients on one asyncio loop: the loop watches their sockets, no thread each.

paho's external-loop API (socket open/close and want-write callbacks, `loop_read`,
`loop_write`, `loop_misc`) lets one loop drive thousands of meters with the very client
the single-meter reference uses, where `loop_start()` would cost a thread per meter.
The exception is connecting: paho's TCP connect and TLS handshake block, so they run in a
small thread pool (which also bounds how many handshakes a fleet throws at the broker at
once) and hand the socket back to the loop. Every other paho call happens on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from meterproof.backoff import Backoff

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike

log = structlog.get_logger("meter.network")

LinkState = Literal["idle", "connecting", "handshaking", "up", "down", "closing", "closed"]
CLOSE_TIMEOUT_S: Final = 5.0


class LinkListener(Protocol):
    """What the owner of a link hears, always on the loop thread."""

    def link_up(self, *, session_present: bool) -> None: ...

    def link_down(self) -> None: ...

    def tick(self, now: float) -> None: ...


class Network:
    """One loop, one connect pool and one ticker (keepalives, timers) for all links."""

    def __init__(self, *, connect_workers: int = 4, tick_s: float = 0.5) -> None:
        if connect_workers < 1:
            raise ValueError(f"connect_workers must be at least 1, not {connect_workers}")
        if tick_s <= 0:
            raise ValueError(f"tick_s must be positive, not {tick_s}")
        self.tick_s = tick_s
        self._connect_workers = connect_workers
        self._links: set[Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_id = 0
        self._pool: ThreadPoolExecutor | None = None
        self._ticker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Network:
        self._loop = asyncio.get_running_loop()
        self._thread_id = threading.get_ident()
        self._pool = ThreadPoolExecutor(self._connect_workers, thread_name_prefix="mqtt-connect")
        self._ticker = asyncio.create_task(self._tick_forever(), name="mqtt-ticker")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(link.close() for link in list(self._links)))
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("use the Network as `async with Network() as network:`")
        return self._loop

    def open(
        self,
        client: mqtt.Client,
        *,
        name: str,
        brokers: Sequence[tuple[str, int]],
        listener: LinkListener,
        keepalive: int = 30,
        properties: Properties | None = None,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
    ) -> Link:
        """Start connecting `client` to the first of `brokers` (MQTT 5, `clean_start=False`
        from the first connect); see `Link` for how it moves along the list."""
        link = Link(
            self,
            client,
            name=name,
            listener=listener,
            brokers=brokers,
            keepalive=keepalive,
            properties=properties,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
        )
        self._links.add(link)
        link.connect_now()
        return link

    def forget(self, link: Link) -> None:
        self._links.discard(link)

    def submit_connect(self, client: mqtt.Client) -> asyncio.Future[MQTTErrorCode]:
        if self._pool is None:
            raise RuntimeError("the network is not running")
        return self.loop.run_in_executor(self._pool, client.reconnect)

    def on_loop(self, func: Callable[..., object], *args: Any) -> None:  # noqa: ANN401
        """Run `func` now if on the loop thread, else hand it to the loop."""
        if threading.get_ident() == self._thread_id:
            func(*args)
        else:
            self.loop.call_soon_threadsafe(func, *args)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            for link in list(self._links):
                try:
                    link.tick(now)
                except Exception:  # one meter's bug must not stop every keepalive
                    log.exception("mqtt.tick_failed", client_id=link.name)


class Link:
    """One paho client on the loop: connects, reconnects with jittered backoff, closes.

    With several brokers (an ordered list sharing one CA, CRL and ACL), a failed connect,
    a refused CONNECT or a lost link moves the next attempt to the next broker of the list
    (after the last, the first again), so a meter whose broker died is on the other within
    one backoff step. paho keeps its in-flight publishes across the move and sends them
    again on the new broker; the meter's outbox covers the rest.
    """

    def __init__(
        self,
        network: Network,
        client: mqtt.Client,
        *,
        name: str,
        listener: LinkListener,
        brokers: Sequence[tuple[str, int]],
        keepalive: int,
        properties: Properties | None,
        reconnect_min_s: float,
        reconnect_max_s: float,
    ) -> None:
        if not 0 < reconnect_min_s <= reconnect_max_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        if not brokers:
            raise ValueError("a link needs at least one broker")
        self.network = network
        self.client = client
        self.name = name
        self.listener = listener
        self.brokers = tuple(brokers)
        #: Index in `brokers` of the broker the link is on (or tries next).
        self.current = 0
        self._keepalive = keepalive
        self._properties = properties
        self.state: LinkState = "idle"
        self._backoff = Backoff(initial=reconnect_min_s, maximum=reconnect_max_s)
        self._warned = False  # one warning per outage, not one per attempt
        self._retry: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Future[MQTTErrorCode] | None = None
        self._closed = asyncio.Event()
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._done_writing
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        self._aim()

    @property
    def is_up(self) -> bool:
        return self.state == "up"

    @property
    def broker(self) -> tuple[str, int]:
        return self.brokers[self.current]

    def _aim(self) -> None:
        """Point the client at `broker`; the next (re)connect goes there."""
        host, port = self.broker
        self.client.connect_async(
            host, port, self._keepalive, clean_start=False, properties=self._properties
        )

    def _next_broker(self) -> None:
        if len(self.brokers) > 1:
            self.current = (self.current + 1) % len(self.brokers)
            self._aim()
            host, port = self.broker
            log.info("mqtt.broker_next", client_id=self.name, broker=f"{host}:{port}")

    def connect_now(self) -> None:
        self._retry = None
        self.state = "connecting"
        self._connecting = self.network.submit_connect(self.client)
        self._connecting.add_done_callback(self._connect_done)

    def tick(self, now: float) -> None:
        if self.state in ("handshaking", "up"):
            self.client.loop_misc()  # keepalive pings; drops a link silent for too long
        self.listener.tick(now)

    async def close(self, *, graceful: bool = True) -> None:
        """Graceful: send DISCONNECT (the session stays). Not graceful: drop the socket as
        a power cut would, leaving unacknowledged messages to the session and outbox."""
        if self.state == "closed":
            return
        previous, self.state = self.state, "closing"
        if self._retry is not None:
            self._retry.cancel()
        if previous == "connecting" and self._connecting is not None:
            with contextlib.suppress(Exception):
                await self._connecting  # bounded by the client's connect_timeout
        if graceful and previous == "up":
            self.client.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), CLOSE_TIMEOUT_S)
        self._drop_socket()
        self.state = "closed"
        self.network.forget(self)

    def _drop_socket(self) -> None:
        """Close without DISCONNECT: shut the socket down and let paho read the EOF."""
        sock = self.client.socket()
        if sock is None:
            return
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.client.loop_read()

    def _connect_done(self, future: asyncio.Future[MQTTErrorCode]) -> None:
        self._connecting = None
        if self.state != "connecting":
            return  # closing, or the CONNACK was already read (the loop ran first)
        error = future.exception()
        if error is None:
            self.state = "handshaking"  # TLS is up and CONNECT queued; CONNACK next
            return
        level = log.debug if self._warned else log.warning
        level("mqtt.connect_failed", client_id=self.name, error=repr(error))
        self._warned = True
        self._next_broker()
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        self.state = "down"
        self._retry = self.network.loop.call_later(self._backoff.next_s(), self.connect_now)

    def _connected(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            # paho closes the socket next and reports it through `_disconnected`.
            log.warning("mqtt.connect_refused", client_id=self.name, reason=str(reason))
            return
        self.state = "up"
        self._backoff.reset()
        self._warned = False
        self.listener.link_up(session_present=flags.session_present)

    def _disconnected(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self.state == "closing":
            self._closed.set()
            return
        if self.state == "down":
            # paho 2.1's loop_misc reports a keepalive timeout twice (its keepalive check,
            # then its unanswered-ping check): the second would move the link on again,
            # back to the silent broker, and start a second connect of the same client.
            return
        was_up = self.state == "up"
        self._next_broker()  # lost or refused: the next attempt goes to the next broker
        self._schedule_retry()
        if was_up:
            log.info("mqtt.link_lost", client_id=self.name, reason=str(reason))
            self.listener.link_down()

    def _socket_open(self, client: mqtt.Client, userdata: object, sock: SocketLike) -> None:
        self.network.on_loop(self.network.loop.add_reader, sock, self._readable)

    def _socket_close(self, client: mqtt.Client, userdata: object, sock: SocketLike) -> None:
        # Always on the loop thread: sockets are closed only by loop_read/write/misc.
        self.network.loop.remove_reader(sock)
        self.network.loop.remove_writer(sock)

    def _want_write(self, client: mqtt.Client, userdata: object, sock: SocketLike) -> None:
        self.network.on_loop(self.network.loop.add_writer, sock, self.client.loop_write)

    def _done_writing(self, client: mqtt.Client, userdata: object, sock: SocketLike) -> None:
        self.network.on_loop(self.network.loop.remove_writer, sock)

    def _readable(self) -> None:
        rc = self.client.loop_read()
        # TLS may hold whole records already decrypted, which the selector cannot see.
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            sock = self.client.socket()
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                break
            rc = self.client.loop_read()
