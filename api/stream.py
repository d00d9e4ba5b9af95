"""`stream/energy`: a meter's readings over a WebSocket as they are stored, for the meter
itself, operators, and integrators whose consent covers them (scope `live`).

The feed is PostgreSQL, not the broker: every `POLL_S` the stream asks reading_log's
(meter_id, ts, seq) index for what was stored after the last reading it sent, so readings
from both doors (MQTT and HTTP) arrive, each passing `may_see` for its own time. On every
tick the integrator's consent is asked again at the current time, against the view
reloaded on NOTIFY: a revoked consent or integrator closes the stream (code 4403, the
policy's reason) within POLL_S plus the view's reload, about a second. A query per open
stream per tick is the cost; many streams want the broker's per-integrator feed instead
(docs/api.md)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import orjson
import structlog
from fastapi import WebSocket
from psycopg_pool import AsyncConnectionPool
from starlette.websockets import WebSocketDisconnect

from meterproof.api import reads
from meterproof.api.auth import Principal, Role, Scope, identify
from meterproof.api.errors import ApiError
from meterproof.api.telemetry import REFUSALS
from meterproof.consent.model import Refusal
from meterproof.consent.model import Scope as ConsentScope
from meterproof.consent.policy import may_see
from meterproof.ingest.audience import REFUSALS as CONSUMER_REFUSALS
from meterproof.ingest.audience import Audience
from meterproof.schemas.timestamps import wall_ms

log = structlog.get_logger("api.stream")

POLL_S: Final = 0.2
_PAGE: Final = 500
#: WebSocket close codes: 4000 + the HTTP status the same refusal gets.
_CLOSE: Final = {401: 4401, 403: 4403}


async def energy(websocket: WebSocket, meter_id: str) -> None:
    """Accept, then send each stored reading (the verified reading's JSON) until the
    client leaves or the policy refuses."""
    await websocket.accept()
    try:
        who = identify(
            websocket.app.state.tokens, websocket.scope, websocket.headers.get("authorization"),
            (Role.OPERATOR, Role.INTEGRATOR, Role.METER), Scope.READINGS,
        )  # fmt: skip
        if who.role is Role.METER and who.name != meter_id:
            raise ApiError(403, "not_this_meter", "a meter streams its own readings only")
        audience: Audience = websocket.app.state.services.audience
        pool: AsyncConnectionPool = websocket.app.state.services.pool
        _check(audience, who, meter_id, wall_ms())
        last = await reads.latest(pool, meter_id)
        after = (last["ts"], last["seq"]) if last else (0, 0)
        log.info("stream_opened", meter_id=meter_id, who=who.name, role=who.role)
        await _follow(
            websocket, audience=audience, pool=pool, who=who, meter_id=meter_id, after=after
        )
    except ApiError as refusal:
        REFUSALS.labels(code=refusal.code).inc()
        log.warning("stream_refused", meter_id=meter_id, code=refusal.code, detail=refusal.detail)
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close(code=_CLOSE.get(refusal.status, 4400), reason=refusal.code)
    except WebSocketDisconnect:
        log.info("stream_closed", meter_id=meter_id)


async def _follow(
    websocket: WebSocket,
    *,
    audience: Audience,
    pool: AsyncConnectionPool,
    who: Principal,
    meter_id: str,
    after: tuple[int, int],
) -> None:
    gone = asyncio.create_task(websocket.receive())  # the client's close, or anything
    try:
        while not gone.done():
            now = wall_ms()
            _check(audience, who, meter_id, now)
            page = await reads.history(
                pool, meter_id, from_ms=after[0], to_ms=now + 86_400_000, after=after,
                limit=_PAGE,
            )  # fmt: skip
            for reading in page:
                after = (reading["ts"], reading["seq"])
                if _allowed(audience, who, meter_id, reading["ts"], now):
                    await websocket.send_text(orjson.dumps(reading).decode())
            await asyncio.wait({gone}, timeout=POLL_S)
    finally:
        gone.cancel()


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
