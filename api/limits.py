"""Rate limits per class of endpoint (seed 000's defaults, configurable), per caller.

A fixed one-minute window per (class, caller), in this process: the caller is who a
valid bearer token names (verified here, once per request: `auth.bearer_principal`), else
the meter of a client certificate, else the peer address. A header that does not verify
counts against its peer address, so made-up tokens neither escape the limit nor add
windows; the token endpoint always counts by peer address, so guessing a client secret is
slowed whatever else the request carries. Seed 003's submissions count per provider id
(seed 003's 100 a minute by default) and, since that id is the body's own claim until
the pipeline has verified the signature, per peer address too. Every limited
answer carries `X-RateLimit-Limit`, `-Remaining` and `-Reset` (seconds); a refused one is
429 `rate_limited` (the pipeline's code for a meter over its rate) with `Retry-After`.
Several API processes each count their own callers: the limit is per process."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Coroutine
from enum import StrEnum
from typing import Any, Final

from fastapi import Request, Response

from meterproof.api.auth import PEER_CN, Tokens, bearer_principal
from meterproof.api.errors import ApiError
from meterproof.api.settings import ApiSettings
from meterproof.schemas.reading import RejectReason

WINDOW_S: Final = 60.0
#: Windows kept before old ones are swept: bounds memory under many callers.
_SWEEP_AT: Final = 100_000


class Limit(StrEnum):
    AUTH = "auth"  #: tokens, wallet challenges and proofs
    SUBMISSION = "submission"  #: readings, per device
    STATUS = "status"  #: health, registry records
    ANALYTICS = "analytics"  #: latest, history, meters by wallet
    PROVIDER = "provider"  #: seed 003 reading submissions, per provider id
    PROVIDER_ADDRESS = "provider_address"  #: ... and per client address


def per_minute(settings: ApiSettings, kind: Limit) -> int:
    return {
        Limit.AUTH: settings.api_rate_auth_per_min,
        Limit.SUBMISSION: settings.api_rate_submission_per_min,
        Limit.STATUS: settings.api_rate_status_per_min,
        Limit.ANALYTICS: settings.api_rate_analytics_per_min,
        Limit.PROVIDER: settings.api_rate_provider_per_min,
        Limit.PROVIDER_ADDRESS: settings.api_rate_provider_address_per_min,
    }[kind]


class Limiter:
    def __init__(self, settings: ApiSettings) -> None:
        self._settings = settings
        self._windows: dict[tuple[Limit, str], tuple[float, int]] = {}

    def take(self, kind: Limit, caller: str) -> dict[str, str]:
        """Count one request; its headers, or ApiError 429 when over the limit."""
        now = time.monotonic()
        if len(self._windows) > _SWEEP_AT:
            self._windows = {k: v for k, v in self._windows.items() if v[0] > now}
        ends, used = self._windows.get((kind, caller), (0.0, 0))
        if ends <= now:
            ends, used = now + WINDOW_S, 0
        limit = per_minute(self._settings, kind)
        reset = str(math.ceil(ends - now))
        headers = {"X-RateLimit-Limit": str(limit), "X-RateLimit-Reset": reset}
        if used >= limit:
            raise ApiError(
                429,
                RejectReason.RATE_LIMITED.value,
                f"over {limit} {kind} requests a minute",
                headers={**headers, "X-RateLimit-Remaining": "0", "Retry-After": reset},
            )
        self._windows[kind, caller] = (ends, used + 1)
        return {**headers, "X-RateLimit-Remaining": str(limit - used - 1)}


def peer(request: Request) -> str:
    """The caller's window key by its address (the TCP peer: no proxy headers are read)."""
    return f"address:{request.client.host if request.client else '-'}"


def _caller(request: Request) -> str:
    authorization = request.headers.get("authorization")
    if authorization:
        tokens: Tokens = request.app.state.tokens
        try:
            who = bearer_principal(tokens, request.scope, authorization)
        except ApiError:
            pass  # refused by the route's own check; counted by where it comes from
        else:
            return f"{who.role}:{who.name}"
    cn = request.scope.get("state", {}).get(PEER_CN)
    if isinstance(cn, str):
        return f"meter:{cn}"
    return peer(request)


def limited(
    kind: Limit, *, by_address: bool = False
) -> Callable[[Request, Response], Coroutine[Any, Any, None]]:
    """A dependency counting the request against `kind`, per caller (`by_address`: per
    peer address whatever the request carries)."""

    async def dependency(request: Request, response: Response) -> None:
        limiter: Limiter = request.app.state.limiter
        caller = peer(request) if by_address else _caller(request)
        response.headers.update(limiter.take(kind, caller))

    return dependency
