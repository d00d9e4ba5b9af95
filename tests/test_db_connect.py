"""A connection attempt that timed out leaves no socket open (`meterproof.db.connect`, and
the API's read pool).

The server here takes TCP and never answers, as a paused one does; what matters is
whether its end of each attempt sees the client go at once. The garbage collector is off
during each test: it would close a leaked attempt at a moment of its choosing."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
from collections.abc import Callable, Iterator

import psycopg
import pytest

from meterproof.api.reads import ReadPool
from meterproof.db.connect import connect_async, connect_sync
from meterproof.stack.process import LOOPBACK


class _Mute:
    """Accepts connections and never answers; keeps its end of each."""

    def __init__(self) -> None:
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            self.accepted.append(conn)

    def client_gone(self) -> list[bool]:
        """For each accepted connection, whether the client has closed its end."""
        return [_at_eof(conn) for conn in self.accepted]

    def close(self) -> None:
        self._listener.close()
        for conn in self.accepted:
            conn.close()


def _at_eof(conn: socket.socket) -> bool:
    conn.setblocking(False)
    try:
        while conn.recv(4096):  # what the client sent before it gave up
            pass
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    return True


@pytest.fixture
def mute() -> Iterator[_Mute]:
    server = _Mute()
    gc.disable()
    try:
        yield server
    finally:
        gc.enable()
        server.close()


def _url(server: _Mute) -> str:
    return f"postgresql://nobody@{LOOPBACK}:{server.port}/x"


def test_psycopg_leaves_a_timed_out_attempt_open_until_garbage_collection(mute: _Mute) -> None:
    """The premise: once psycopg closes it itself, `db.connect` has no reason to be."""
    with pytest.raises(psycopg.errors.ConnectionTimeout):
        psycopg.connect(_url(mute), connect_timeout=1)
    assert mute.client_gone() == [False]
    gc.collect()
    assert mute.client_gone() == [True]


@pytest.mark.parametrize("how", ["sync", "async", "api_pool"])
def test_a_timed_out_attempt_is_closed_when_the_error_is_raised(mute: _Mute, how: str) -> None:
    pool = ReadPool(_url(mute), answer_within_s=1, open=False)  # its connect only
    attempt: Callable[[], object] = {
        "sync": lambda: connect_sync(_url(mute), connect_timeout=1),
        "async": lambda: asyncio.run(connect_async(_url(mute), connect_timeout=1)),
        "api_pool": lambda: asyncio.run(pool._connect(timeout=1)),
    }[how]
    with pytest.raises(psycopg.errors.ConnectionTimeout, match="connection timeout expired"):
        attempt()
    assert mute.client_gone() == [True]
