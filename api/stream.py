"""WebSocket streams of one meter: `stream/energy` (its readings as they are stored),
`stream/status` (its registry status and each change) and `stream/alerts` (its security
events as they are recorded).

The feed is PostgreSQL, not the broker: every `POLL_S` a stream asks for what came after
the last thing it sent (reading_log's (meter_id, ts, seq) index, the security events'
ids), so readings from both doors (MQTT and HTTP) arrive. Energy is for the meter itself,
operators, and integrators whose consent covers it (scope `live`): each reading passes
`may_see` for its own time, and on every tick the integrator's consent is asked again at
the current time against the view reloaded on NOTIFY, so a revoked consent or integrator
closes the stream (code 4403, the policy's reason) within POLL_S plus the view's reload.
Status and alerts are for operators and the meter itself. Every tick of every stream also
asks whether the caller's credentials still hold (`auth.still_valid`): a token past its
`exp` closes it 4401 `token_expired`, a meter certificate revoked since it opened 4401
`certificate_revoked`, as a request would be answered. A poll that finds the database
away (a failover) closes it 4503 `unavailable`, as a request gets 503: the client opens it
again. A query per open stream per tick is the cost; many streams want the broker's
per-integrator feed instead (docs/api.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Final

import orjson
import structlog
from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect

from meterproof.api import reads
from meterproof.api.auth import Principal, Role, Scope, identify, still_valid
from meterproof.api.errors import ApiError, as_api_error
from meterproof.api.telemetry import REFUSALS
from meterproof.consent.model import Refusal
from meterproof.consent.model import Scope as ConsentScope
from meterproof.consent.policy import may_see
from meterproof.errors import MeterproofError
from meterproof.ingest.audience import REFUSALS as CONSUMER_REFUSALS
from meterproof.ingest.audience import Audience
from meterproof.schemas.timestamps import wall_ms

log = structlog.get_logger("api.stream")

POLL_S: Final = 0.2
_PAGE: Final = 500
#: WebSocket close codes: 4000 + the HTTP status the same refusal gets.
_CLOSE: Final = {401: 4401, 403: 4403, 404: 4404, 503: 4503}
_OWNER_ROLES: Final = (Role.OPERATOR, Role.METER)

#: What to send now, one JSON text per message; raises ApiError to close the stream.
Poll = Callable[[], Awaitable[list[str]]]
#: Given the caller, its first check and its poll.
Start = Callable[[Principal], Awaitable[Poll]]


async def energy(websocket: WebSocket, meter_id: str) -> None:
    audience: Audience = websocket.app.state.services.audience
    pool: reads.ReadPool = websocket.app.state.services.pool

    async def start(who: Principal) -> Poll:
        _check(audience, who, meter_id, wall_ms())
        after = (await reads.latest(pool, meter_id)).last or (0, 0)

        async def poll() -> list[str]:
            nonlocal after
            now = wall_ms()
            _check(audience, who, meter_id, now)
            span = reads.Span(meter_id, after[0], now + 86_400_000, after, _PAGE)
            page = await reads.history(pool, span)
            after = page.last or after
            return [
                reads.finish([line]).decode()
                for ts, line in zip(page.times, page.lines, strict=True)
                if _allowed(audience, who, meter_id, ts, now)
            ]

        return poll

    roles = (*_OWNER_ROLES, Role.INTEGRATOR)
    await _serve(websocket, meter_id, roles, Scope.READINGS, start)


async def status(websocket: WebSocket, meter_id: str) -> None:
    pool: reads.ReadPool = websocket.app.state.services.pool

    async def start(who: Principal) -> Poll:
        sent: str | None = None

        async def poll() -> list[str]:
            nonlocal sent
            now = await reads.meter_status(pool, meter_id)
            if now is None:
                raise ApiError(404, "unknown_meter", f"no meter {meter_id}")
            changed, sent = now != sent, now
            if not changed:
                return []
            return [_json({"meter_id": meter_id, "status": now, "at_ms": wall_ms()})]

        return poll

    await _serve(websocket, meter_id, _OWNER_ROLES, Scope.METERS, start)


async def alerts(websocket: WebSocket, meter_id: str) -> None:
    pool: reads.ReadPool = websocket.app.state.services.pool

    async def start(who: Principal) -> Poll:
        after = await reads.last_event_id(pool, meter_id)

        async def poll() -> list[str]:
            nonlocal after
            events = await reads.events_after(pool, meter_id, after, limit=_PAGE)
            if events:
                after = events[-1]["id"]
            return [_json(e) for e in events]

        return poll

    await _serve(websocket, meter_id, _OWNER_ROLES, Scope.METERS, start)


async def _serve(
    websocket: WebSocket, meter_id: str, roles: Collection[Role], needed: Scope, start: Start
) -> None:
    """Accept, authenticate, then send what each poll finds, one JSON text message each,
    until the client leaves or a refusal closes the stream."""
    await websocket.accept()
    try:
        who = identify(
            websocket.app.state.tokens, websocket.scope, websocket.headers.get("authorization"),
            roles, needed,
        )  # fmt: skip
        if who.role is Role.METER and who.name != meter_id:
            raise ApiError(403, "not_this_meter", "a meter streams its own data only")
        poll = await start(who)
        log.info("stream_opened", path=websocket.url.path, who=who.name, role=who.role)
        gone = asyncio.create_task(websocket.receive())  # the client's close, or anything
        try:
            while not gone.done():
                still_valid(who, websocket.scope)
                for message in await poll():
                    await websocket.send_text(message)
                await asyncio.wait({gone}, timeout=POLL_S)
        finally:
            gone.cancel()
    except MeterproofError as exc:  # a refusal, or the database away (as a request: 503)
        refusal = as_api_error(exc)
        REFUSALS.labels(code=refusal.code).inc()
        log.warning("stream_refused", path=websocket.url.path, code=refusal.code,
                    detail=refusal.detail)  # fmt: skip
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close(code=_CLOSE.get(refusal.status, 4400), reason=refusal.code)
    except WebSocketDisconnect:
        log.info("stream_closed", path=websocket.url.path)


def _json(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()


def _allowed(audience: Audience, who: Principal, meter_id: str, ts_ms: int, now_ms: int) -> bool:
    if who.role is not Role.INTEGRATOR:
        return True
    return may_see(
        who.name, meter_id, ts_ms, ConsentScope.LIVE, view=audience.view, now_ms=now_ms
    ).allowed


def _check(audience: Audience, who: Principal, meter_id: str, now_ms: int) -> None:
    """Refuse an integrator whose live consent for the meter no longer holds now; a
    reading outside its period is only skipped (`_allowed`)."""
    if who.role is not Role.INTEGRATOR:
        return
    decision = may_see(
        who.name, meter_id, now_ms, ConsentScope.LIVE, view=audience.view, now_ms=now_ms
    )
    if decision.refusal is not None and decision.refusal is not Refusal.PERIOD:
        CONSUMER_REFUSALS.labels(
            door="websocket", integrator=who.name, reason=decision.refusal
        ).inc()
        raise ApiError(
            403, decision.refusal.value, f"the consent policy refuses: {decision.refusal}"
        )
