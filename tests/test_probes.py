"""The probe endpoints every long-running process serves."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

from meterproof.probes import serve_probes
from meterproof.stack.process import free_port


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_readiness_follows_the_process_and_metrics_are_served() -> None:
    ready = False
    probes = serve_probes("127.0.0.1", free_port(), ready=lambda: ready)
    assert probes is not None
    try:
        assert _get(probes.port, "/healthz") == (200, b"ok\n")
        assert _get(probes.port, "/readyz") == (503, b"not ready\n")
        ready = True
        assert _get(probes.port, "/readyz") == (200, b"ready\n")
        status, body = _get(probes.port, "/metrics")
        assert status == 200
        assert b"# TYPE" in body
        for mistyped in ("/", "/health", "/ready", "/healthz/x"):
            assert _get(probes.port, mistyped)[0] == 404, mistyped
    finally:
        probes.close()


def test_a_taken_port_or_port_zero_serves_nothing_and_raises_nothing() -> None:
    assert serve_probes("127.0.0.1", 0, ready=lambda: True) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve_probes("127.0.0.1", taken.getsockname()[1], ready=lambda: True) is None
