"""A synchronous WebSocket client for tests that keeps each TLS session on one thread.

websockets' own sync client reads in a background thread while the caller writes. On a
TLS socket that puts two threads in one OpenSSL session at once, which OpenSSL does not
support: with TLS 1.3 the server's session tickets arrive just as the client sends its
upgrade request, and now and then the request never reached the wire (the client's
socket counters showed the handshake sent and nothing after it). The API never saw it,
the client waited for an answer, then hung joining its reader. Here every call runs
websockets' asyncio client on a private event loop until that call is done, so one thread
does all reading and writing; between calls nothing is read, which tests do not mind."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from websockets.asyncio.client import ClientConnection, connect


class WebSocket:
    """One open connection; `recv` raises websockets' ConnectionClosed once it closes."""

    def __init__(self, runner: asyncio.Runner, connection: ClientConnection) -> None:
        self._runner = runner
        self._connection = connection

    def recv(self, timeout: float) -> str | bytes:
        return self._runner.run(asyncio.wait_for(self._connection.recv(), timeout))


@contextmanager
def websocket(
    uri: str, *, tls: ssl.SSLContext, headers: Mapping[str, str] | None = None
) -> Iterator[WebSocket]:
    async def open_() -> ClientConnection:
        return await connect(
            uri, ssl=tls, additional_headers=headers, open_timeout=10, close_timeout=5
        )

    with asyncio.Runner() as runner:
        connection = runner.run(open_())
        try:
            yield WebSocket(runner, connection)
        finally:
            runner.run(connection.close())
