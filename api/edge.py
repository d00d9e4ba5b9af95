"""What every request goes through before and after its route: a correlation id (echoed
in `X-Correlation-ID`), the body size limit (413 before the body is read when the length
is declared, while reading otherwise), and the request metrics per route and status."""

from __future__ import annotations

import time
from typing import Final

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meterproof.api.errors import CORRELATION_HEADER, ApiError, correlation_id, problem
from meterproof.api.telemetry import LATENCY, REQUESTS

_UNMATCHED: Final = "unmatched"


class Edge:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self._app = app
        self._max = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        scope.setdefault("state", {})
        request = Request(scope)
        cid = correlation_id(request)
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-correlation-id" for k, _ in headers):
                    headers.append((CORRELATION_HEADER.lower().encode(), cid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        seen = 0

        async def receiving() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self._max:
                    raise ApiError(413, "too_large", f"the body exceeds {self._max} bytes")
            return message

        try:
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self._max:
                error = ApiError(413, "too_large", f"the body exceeds {self._max} bytes")
                await problem(request, error)(scope, receive, sending)
            else:
                await self._app(scope, receiving, sending)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", _UNMATCHED)
            REQUESTS.labels(method=request.method, route=path, status=str(status)).inc()
            LATENCY.labels(method=request.method, route=path).observe(time.perf_counter() - started)
