"""Waiting for a `meterproof api` process someone started (the demo, the API benchmark,
the tests start it as a user does): ready once its `/health` says the submission
pipeline runs, which is later than the port answering."""

from __future__ import annotations

import ssl
import subprocess
import time
from pathlib import Path

import httpx


class ApiNotReadyError(RuntimeError):
    """The process exited, or did not get ready in time; the message names its log."""


def wait_ready(
    url: str, ca_cert: Path, proc: subprocess.Popen[bytes], log: Path, *, within_s: float
) -> None:
    """Until `url`/health answers over TLS (verified against `ca_cert`) with submissions
    running; raises `ApiNotReadyError` when `proc` exits or `within_s` passes first."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + within_s
    with httpx.Client(base_url=url, verify=context, timeout=2.0) as http:
        while True:
            if proc.poll() is not None:
                raise ApiNotReadyError(f"meterproof api exited {proc.returncode}; see {log}")
            try:
                if http.get("/health").json().get("submissions"):
                    return
            except (httpx.TransportError, ValueError):
                pass  # not listening yet, or not answering JSON yet
            if time.monotonic() > deadline:
                raise ApiNotReadyError(f"meterproof api not ready in {within_s:g} s; see {log}")
            time.sleep(0.1)
