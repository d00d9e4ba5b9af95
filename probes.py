"""The HTTP endpoints an orchestrator probes, for every long-running process:
/metrics (Prometheus), /healthz (the process runs) and /readyz (it can do its work now).

A taken port is logged, not fatal: the work matters more than its telemetry, and a crash
loop over a port would stop it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

import structlog
from prometheus_client import make_wsgi_app

log = structlog.get_logger("probes")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Probes every few seconds would drown the JSON log."""


class Probes:
    """The endpoints on a daemon thread; `close()` stops them."""

    def __init__(self, server: WSGIServer) -> None:
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="probes", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_probes(host: str, port: int, *, ready: Callable[[], bool]) -> Probes | None:
    """Serve the three endpoints; None when `port` is 0 (off) or cannot be bound."""
    if not port:
        return None
    metrics = make_wsgi_app()

    def app(environ: WSGIEnvironment, start: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            start("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            ok = ready()
            start("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ready\n" if ok else b"not ready\n"]
        if path == "/metrics":
            body: Iterable[bytes] = metrics(environ, start)
            return body
        # not metrics for any path: a probe aimed at a mistyped path would pass forever
        start("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: /healthz, /readyz or /metrics\n"]

    try:
        server = make_server(host, port, app, handler_class=_QuietHandler)
    except OSError as exc:
        log.error("metrics_unavailable", port=port, error=str(exc))
        return None
    return Probes(server)
