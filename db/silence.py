"""A PostgreSQL server that stops answering without closing its connections.

A host lost without a reset (power, a partition, a paused VM) or a server stalled on its
disk leaves every wait on its sockets open: for a request sent, only the kernel's
retransmissions end it (about 15 minutes), and a connection that only listens for
notifications is never told. A worker would hold its batch and its receipts that long,
and a registry or consent change notified meanwhile would never reach it.

So a wait that matters is bounded: past its deadline the connection's socket is shut down
under it, the wait fails at once as on any lost connection (psycopg's `OperationalError`),
and the caller's own path for a lost database takes over (a new connection, a COMMIT in
doubt looked for). Shutting the socket down, not closing it, is safe from another thread:
the descriptor stays the connection's until psycopg closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, TypeVar

import psycopg
import structlog
from prometheus_client import Counter
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from meterproof.db.connect import connect_sync

log = structlog.get_logger("db.silence")

_T = TypeVar("_T")

SILENT: Final = Counter(
    "meterproof_database_silent",
    "Waits on PostgreSQL given up because the server answered nothing in time",
    ["wait"],
)

#: A connection that only listens makes a round trip at least this often.
PROBE_EVERY_S: Final = 5.0

#: libpq refuses a connect_timeout under 2 s (it takes it as 2).
_MIN_CONNECT_S: Final = 2


def bounded(url: str, timeout_s: float) -> str:
    """`url` with libpq's `connect_timeout` (per host tried) set from `timeout_s`, unless
    it sets its own, which wins."""
    if "connect_timeout" in conninfo_to_dict(url):
        return url
    return make_conninfo(url, connect_timeout=max(_MIN_CONNECT_S, math.ceil(timeout_s)))


def cut(conn: psycopg.BaseConnection[Any]) -> None:
    """Shut `conn`'s socket down, from any thread: the wait on it ends at once."""
    with contextlib.suppress(psycopg.Error, OSError):
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


@dataclass
class Deadline:
    """What `deadline` yields: `fired` once the connection was cut."""

    fired: bool = False


@contextlib.contextmanager
def deadline(*, within_s: float, cut_off: Callable[[], None], wait: str) -> Iterator[Deadline]:
    """While inside: if still inside after `within_s`, `cut_off` ends the connection, and
    the wait on it fails as on a lost one; `wait` names it in the log and the metric. A
    timer, not a cancellation: a transaction's thread cannot be cancelled, and a cancelled
    psycopg wait on a silent server sends a cancel request first (seconds more). The timer
    is the event loop's where one runs, else a timer thread (the bridge, a synchronous
    route's thread); either way no cut comes after the block ends."""
    state = Deadline()
    guard = threading.Lock()
    inside = True

    def expire() -> None:
        with guard:
            if not inside:
                return
            state.fired = True
            SILENT.labels(wait=wait).inc()
            log.error("database_silent", wait=wait, waited_s=within_s)
            cut_off()

    timer: asyncio.TimerHandle | threading.Timer
    try:
        timer = asyncio.get_running_loop().call_later(within_s, expire)
    except RuntimeError:  # no event loop in this thread
        timer = threading.Timer(within_s, expire)
        timer.daemon = True
        timer.start()
    try:
        yield state
    finally:
        with guard:
            inside = False
        timer.cancel()


@contextlib.contextmanager
def connected(url: str, *, within_s: float, wait: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to `url` for one piece of work in this thread, no wait of
    which (the connect included) lasts past `within_s` on a silent server."""
    with (
        connect_sync(bounded(url, within_s), autocommit=True) as conn,
        deadline(within_s=within_s, cut_off=partial(cut, conn), wait=wait),
    ):
        yield conn


async def answered(
    job: Awaitable[_T], *, within_s: float, cut_off: Callable[[], None], wait: str
) -> _T:
    """`job`'s result, under a `deadline`."""
    with deadline(within_s=within_s, cut_off=cut_off, wait=wait):
        return await job


class ListenProbe:
    """A LISTEN connection hears nothing from a silent server and nothing from a quiet
    channel alike. A round trip every `PROBE_EVERY_S` (or `within_s`, if shorter) tells
    them apart: on a silent one it fails, and the listener connects again (and drops
    what it cached, as after any lost listen, since notifications may have been missed)."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], *, within_s: float, wait: str) -> None:
        self._conn = conn
        self._within_s = within_s
        self._every_s = min(PROBE_EVERY_S, within_s)
        self._wait = wait
        self._last = time.monotonic()

    async def when_due(self) -> None:
        """A round trip if none was made for a while; fails as on a lost connection."""
        if time.monotonic() - self._last < self._every_s:
            return
        await answered(
            self._conn.execute("SELECT 1"),
            within_s=self._within_s,
            cut_off=partial(cut, self._conn),
            wait=self._wait,
        )
        self._last = time.monotonic()
