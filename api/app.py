"""The FastAPI application: routes, who may call each, and the services they share.

`create_app` wires the services in its lifespan: a PostgreSQL pool for reads, the consent
view (`ingest.audience.Audience`, reloaded on NOTIFY), and an ingest `Worker` on the
in-process `HttpSource` for submissions (api/submit.py). Every integrator read goes
through `consent.policy.may_see`; nothing here filters by itself."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Annotated, Any, Final, TypeVar
from uuid import UUID, uuid4

import orjson
import psycopg
import structlog
from fastapi import APIRouter, Body, Depends, FastAPI, Path, Query, Request, WebSocket
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from meterproof.api import pages, reads, stream
from meterproof.api.auth import TOKEN_PATH, Principal, Role, Scope, Token, Tokens, require
from meterproof.api.edge import Edge
from meterproof.api.errors import PROBLEM_TYPE, ApiError, Problem, install
from meterproof.api.limits import Limit, Limiter, limited
from meterproof.api.provider_store import provider_store
from meterproof.api.republish import Republisher
from meterproof.api.settings import ApiSettings
from meterproof.api.submit import HttpSource, receipts
from meterproof.bridge.entry import entry_json
from meterproof.bridge.ledger import local as ledger
from meterproof.bridge.proof import ProofError, build_proof
from meterproof.consent.model import Refusal
from meterproof.consent.model import Scope as ConsentScope
from meterproof.consent.policy import may_see, seen_range
from meterproof.db.rollups import Width, rollups_json
from meterproof.db.silence import connected
from meterproof.errors import UnavailableError, first_line
from meterproof.ingest.audience import REFUSALS, Audience
from meterproof.ingest.worker import Worker
from meterproof.registry import repository, wallets
from meterproof.registry.accounts import AccountId
from meterproof.registry.model import (
    ACCEPTING,
    MeterRecord,
    MeterStatus,
    NewKey,
    NewMeter,
    SecurityLevel,
)
from meterproof.registry.snapshots import fetch_snapshots
from meterproof.schemas.reading import Receipt, SignedReading, VerifiedReading, b64url_decode
from meterproof.schemas.timestamps import wall_ms

log = structlog.get_logger("api")
_T = TypeVar("_T")

router = APIRouter()
_F = TypeVar("_F", bound=Callable[..., Any])


def _route(
    method: str,
    path: str,
    tag: str,
    limit: Limit,
    *,
    also: Sequence[str] = (),
    by_address: bool = False,
    **extra: Any,  # noqa: ANN401 - FastAPI route options
) -> Callable[[_F], _F]:
    """A route of `router`, tagged, and counted against its rate-limit class (per caller,
    or per peer address: `api.limits.limited`)."""
    decorate: Callable[[_F], _F] = router.api_route(
        path, methods=[method], tags=[tag, *also],
        dependencies=[Depends(limited(limit, by_address=by_address))], **extra,
    )  # fmt: skip
    return decorate


MeterIdPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9._-]{1,64}$", max_length=64)]
#: Every operation may answer these; all with a problem body.
_PROBLEMS: Final = (400, 401, 403, 404, 409, 413, 415, 422, 429, 503)
_REASONS: Final = {
    400: "bad request", 401: "no or bad credentials", 403: "refused", 404: "not found",
    409: "conflict with the current state", 413: "body too large",
    415: "unsupported media type", 422: "invalid input or a refused reading",
    429: "rate limited", 503: "a dependency is unavailable; retry",
}  # fmt: skip
_MAX_BATCH: Final = 1000
#: A meter-day at one reading every 5 s (17,280) fits one history page.
_MAX_PAGE: Final = 20_000
_CSV: Final = "text/csv"
_MAX_MS: Final = reads.MAX_MS
_MAX_ROLLUP_MS: Final = 366 * 86_400_000
#: JWT audiences of the meter's registration token and of its key-proof challenge.
_REGISTRATION: Final = "meterproof-registration"
_REGISTRATION_TTL_S: Final = 7 * 86_400
_KEY_PROOF: Final = "meterproof-key-proof"
_CHALLENGE_TTL_S: Final = 300

#: Who may call what: token holders need the scope, a meter is its certificate's CN.
RegistryReader = Annotated[
    Principal, Depends(require(Role.OPERATOR, Role.METER, scope=Scope.METERS))
]
ReadingsReader = Annotated[
    Principal,
    Depends(require(Role.OPERATOR, Role.INTEGRATOR, Role.METER, scope=Scope.READINGS)),
]
RegistryWriter = Annotated[Principal, Depends(require(Role.OPERATOR, scope=Scope.METERS_WRITE))]
WalletsReader = Annotated[Principal, Depends(require(Role.OPERATOR, scope=Scope.METERS))]
WalletLinker = Annotated[
    Principal, Depends(require(Role.OPERATOR, Role.METER, scope=Scope.WALLETS))
]
LedgerReader = ReadingsReader
MeterCaller = Annotated[Principal, Depends(require(Role.METER))]


class Health(BaseModel):
    status: str
    submissions: bool = Field(description="the in-process pipeline is running")


class HistoryPage(BaseModel):
    meter_id: str
    readings: list[VerifiedReading]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: done")


class Batch(BaseModel):
    """Each item is one signed reading-v1 payload, as a string: its bytes are judged as
    sent, exactly as on MQTT."""

    readings: list[Annotated[str, Field(max_length=4096)]] = Field(
        min_length=1, max_length=_MAX_BATCH
    )


class BatchReceipts(BaseModel):
    receipts: list[Receipt]


class LinkRequest(BaseModel):
    account: str = Field(max_length=200, description="CAIP-10 account id")


class ChallengeOut(BaseModel):
    challenge_id: UUID
    account: str
    meter_id: str | None
    document: str = Field(description="sign these exact UTF-8 bytes, with the wallet and the meter")
    expires_at: datetime


class OwnershipProof(BaseModel):
    account: str = Field(max_length=200)
    challenge_id: UUID
    wallet_signature: str = Field(max_length=1000)
    meter_kid: str = Field(max_length=64)
    meter_signature: str = Field(max_length=2000)


class LinkOut(BaseModel):
    meter_id: str
    account: str
    linked_at: datetime


class WalletMeters(BaseModel):
    account: str
    meters: list[str]


#: The reads' sessions: no JIT (with 10 million readings the planner's cost estimates
#: pass jit_above_cost, and compiling took ~1 s of a meter-day's read, docs/api.md).
_SESSION: Final = "-c jit=off"
#: How long a connection of the lagging reads lives: a fallback to the primary lasts so long.
_BACK_TO_STANDBY_S: Final = 60.0


class Services:
    """What the routes share, built in the lifespan."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        within_s = settings.database_timeout_s
        self.pool = reads.ReadPool(
            settings.database_url, answer_within_s=within_s, min_size=1, max_size=8,
            open=False, kwargs={"autocommit": True, "options": _SESSION},
        )  # fmt: skip
        #: History and rollups (docs/api.md, "Reads from a standby"). Each connection is
        #: checked when taken, so one to a standby that went away is replaced (libpq then
        #: falls back to the primary), and renewed after a minute, so reads that fell back
        #: return to the standby once it is back.
        self.lagging = (
            self.pool if settings.database_read_url is None
            else reads.ReadPool(
                settings.database_read_url, answer_within_s=within_s, min_size=1, max_size=8,
                open=False, check=AsyncConnectionPool.check_connection,
                max_lifetime=_BACK_TO_STANDBY_S, kwargs={"autocommit": True, "options": _SESSION},
            )
        )  # fmt: skip
        self.audience = Audience(
            database_url=settings.database_url, timeout_s=settings.database_timeout_s
        )
        identity = settings.republish_identity()
        if identity is None:
            log.warning("republish_off", reason="no `api` identity in the PKI: `certs init`")
        self.republisher = (
            None
            if identity is None
            else Republisher(
                pki_root=settings.pki_root, identity=identity, brokers=settings.brokers(),
                max_pending=settings.api_republish_max_pending,
            )
        )  # fmt: skip
        self.source = HttpSource(self.republisher, max_pending=settings.api_submit_max_pending)
        rules = settings.ingest_settings()
        self.worker = Worker(
            rules, source=self.source, store_factory=provider_store(rules), shares_load=False
        )

    def pools(self) -> list[reads.ReadPool]:
        return [self.pool] if self.lagging is self.pool else [self.pool, self.lagging]


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def _blocking(settings: ApiSettings, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
    """A synchronous psycopg function (registry, wallets, ledger, proofs) on a connection of
    its own, in a thread: the event loop keeps serving meanwhile. A server that leaves it
    unanswered `database_timeout_s` has the connection cut: 503, not a request held."""
    url, within_s = settings.database_url, settings.database_timeout_s

    def run() -> _T:
        try:
            with connected(url, within_s=within_s, wait="api_request") as conn:
                return work(conn)
        except psycopg.Error as exc:
            raise UnavailableError("database", str(exc)) from exc

    return await asyncio.to_thread(run)


def _consented(
    services: Services,
    who: Principal,
    meter_id: str,
    ts_ms: int,
    *,
    scope: ConsentScope = ConsentScope.HISTORY,
) -> ApiError | None:
    """None when `who` may see the meter's reading at `ts_ms`; else the refusal to answer."""
    if who.role is Role.OPERATOR:
        return None
    if who.role is Role.METER:
        if who.name == meter_id:
            return None
        return ApiError(403, "not_this_meter", "a meter reads its own readings only")
    decision = may_see(
        who.name, meter_id, ts_ms, scope,
        view=services.audience.view, now_ms=wall_ms(),
    )  # fmt: skip
    if decision.refusal is None:
        return None
    REFUSALS.labels(door="http", integrator=who.name, reason=decision.refusal).inc()
    return ApiError(403, decision.refusal.value, f"the consent policy refuses: {decision.refusal}")


def _visible(
    services: Services, who: Principal, meter_id: str, times: list[int], *, empty_at: int
) -> list[bool]:
    """Whether `who` may see each item of a page by its time: one outside the consented
    period is left out, any other refusal answers the whole request (an empty page is
    asked about `empty_at`, so a read without consent is refused even when empty)."""
    shown = []
    for ts in times or [empty_at]:
        refusal = _consented(services, who, meter_id, ts)
        if refusal is not None and refusal.code != Refusal.PERIOD:
            raise refusal
        shown.append(refusal is None)
    return shown if times else []


def _own_meter(who: Principal, meter_id: str) -> None:
    if who.role is Role.METER and who.name != meter_id:
        raise ApiError(403, "not_this_meter", f"certificate {who.name} is not meter {meter_id}")


@_route("GET", "/health", "public", Limit.STATUS)
async def health(request: Request) -> Health:
    """Unauthenticated: the process answers, and whether submissions are running."""
    return Health(status="ok", submissions=_services(request).worker.ready())


@_route(
    "POST",
    TOKEN_PATH,
    "auth",
    Limit.AUTH,
    by_address=True,  # whatever Authorization it carries: this is where secrets are guessed
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {
                        "type": "object",
                        "required": ["grant_type", "client_id", "client_secret"],
                        "properties": {
                            "grant_type": {"type": "string", "enum": ["client_credentials"]},
                            "client_id": {"type": "string"},
                            "client_secret": {"type": "string"},
                            "scope": {"type": "string"},
                        },
                    }
                }
            },
        }
    },
)
async def token(request: Request) -> Token:
    """OAuth2 client credentials: an access token for an operator or an integrator."""
    tokens: Tokens = request.app.state.tokens
    return await tokens.issue(await request.body(), request.headers.get("content-type", ""))


@_route("GET", "/api/meters/{meter_id}", "registry", Limit.STATUS)
async def get_meter(
    request: Request,
    meter_id: MeterIdPath,
    who: RegistryReader,
) -> MeterRecord:
    """A meter's registry record: operators, or the meter itself."""
    _own_meter(who, meter_id)
    record = await _blocking(
        _services(request).settings, lambda c: repository.fetch_meter(c, meter_id)
    )
    if record is None:
        raise ApiError(404, "unknown_meter", f"no meter {meter_id}")
    return record


@_route(
    "GET", "/api/meters/{meter_id}/latest", "readings", Limit.ANALYTICS,
    response_model=VerifiedReading,
)  # fmt: skip
async def latest(
    request: Request,
    meter_id: MeterIdPath,
    who: ReadingsReader,
) -> Response:
    """The meter's most recent stored reading; an integrator's passes the consent policy."""
    services = _services(request)
    found = await reads.latest(services.pool, meter_id)
    refusal = _consented(services, who, meter_id, found.times[0] if found.times else wall_ms())
    if refusal is not None:
        raise refusal
    if not found.lines:
        raise ApiError(404, "no_readings", f"no stored reading of meter {meter_id}")
    return Response(reads.finish(found.lines), media_type="application/json")


@_route(
    "GET",
    "/api/meters/{meter_id}/history",
    "readings",
    Limit.ANALYTICS,
    response_model=HistoryPage,
    responses={200: {"content": {_CSV: {"schema": {"type": "string"}}}}},
)
async def history(
    request: Request,
    meter_id: MeterIdPath,
    who: ReadingsReader,
    *,
    from_ms: Annotated[int, Query(alias="from", ge=0, le=_MAX_MS)] = 0,
    to_ms: Annotated[int | None, Query(alias="to", ge=0, le=_MAX_MS)] = None,
    limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 1000,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
    format: Annotated[str, Query(pattern="^(json|csv)$")] = "json",
) -> Response:
    """Readings with from <= ts < to (unix ms), oldest first, a page at a time. Each
    reading passes the consent policy for an integrator: one outside its consented
    period is left out (a page may then be short, follow `next_cursor`); any other
    refusal answers 403 with the policy's reason, as does an empty page without consent."""
    services = _services(request)
    end = to_ms if to_ms is not None else wall_ms() + 86_400_000
    after = None if cursor is None else reads.decode_cursor(cursor)
    csv = format == "csv"
    span = reads.Span(meter_id, from_ms, end, after, limit)
    seen = _seen_span(services, who, span)
    if seen is not None:
        readings = await pages.whole_range(services.lagging, seen, csv=csv)
        if readings is not None:  # everything in one answer: no cursor
            pages.SERVED.labels(way="pages").inc()
            if csv:
                return Response(reads.as_csv(readings), media_type=_CSV)
            return _history_json(meter_id, readings, None)
    pages.SERVED.labels(way="rows").inc()
    page = await reads.history(services.lagging, span, csv=csv)
    lines = page.lines
    if who.role is not Role.OPERATOR:  # the policy, per reading (a meter: its own only)
        visible = _visible(services, who, meter_id, page.times, empty_at=from_ms)
        lines = [line for line, shown in zip(lines, visible, strict=True) if shown]
    last = page.last if len(page.lines) == limit else None
    next_cursor = None if last is None else reads.encode_cursor(last)
    if csv:
        headers = {"X-Next-Cursor": next_cursor} if next_cursor else {}
        return Response(reads.as_csv(reads.csv_lines(lines)), media_type=_CSV, headers=headers)
    return _history_json(meter_id, reads.finish(lines), next_cursor)


def _history_json(meter_id: str, readings: bytes, next_cursor: str | None) -> Response:
    """A HistoryPage of readings rendered by PostgreSQL in the verified reading's shape
    (reads.py, pages.py): no Python value, let alone a model, per reading on the way out."""
    head = orjson.dumps({"meter_id": meter_id, "next_cursor": next_cursor})[:-1]
    body = b"".join((head, b',"readings":[', readings, b"]}"))
    return Response(body, media_type="application/json")


def _seen_span(services: Services, who: Principal, span: reads.Span) -> reads.Span | None:
    """The part of the span whose readings are exactly those `who` may see of it, so none
    needs the policy's decision of its own: all of it for an operator and for the meter
    itself; for an integrator, the range its consents show whole (`seen_range`). None:
    the read is decided per reading."""
    if who.role is Role.INTEGRATOR:
        seen = seen_range(
            who.name, span.meter_id, span.from_ms, span.to_ms, ConsentScope.HISTORY,
            view=services.audience.view, now_ms=wall_ms(),
        )  # fmt: skip
        return None if seen is None else replace(span, from_ms=seen[0], to_ms=seen[1])
    return span if who.role is Role.OPERATOR or who.name == span.meter_id else None


@_route(
    "POST",
    "/api/meters/{meter_id}/energy",
    "submissions",
    Limit.SUBMISSION,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": SignedReading.model_json_schema()}},
        }
    },
)
async def submit(
    request: Request,
    meter_id: MeterIdPath,
    who: MeterCaller,
) -> Receipt:
    """One signed reading-v1 payload from the meter the client certificate names,
    judged by the ingest worker; answered after the commit with the MQTT receipt (a
    rejection: 422, the reason as `code`, the receipt in the problem body)."""
    _own_meter(who, meter_id)
    services = _services(request)
    body = await request.body()
    (receipt,) = await receipts(
        services.source.submit(meter_id, [body]), services.settings.api_submit_timeout_s
    )
    if receipt.reason is not None:
        raise ApiError(
            422, receipt.reason.value, "the reading was refused",
            receipt=receipt.model_dump(mode="json"),
        )  # fmt: skip
    return receipt


@_route("POST", "/api/meters/energy/batch", "submissions", Limit.SUBMISSION)
async def submit_batch(
    request: Request,
    batch: Annotated[Batch, Body()],
    who: MeterCaller,
) -> BatchReceipts:
    """Several payloads of the calling meter; one receipt per item, in order, after
    their commit."""
    services = _services(request)
    futures = services.source.submit(who.name, [r.encode() for r in batch.readings])
    found = await receipts(futures, services.settings.api_submit_timeout_s)
    return BatchReceipts(receipts=found)


@_route("GET", "/api/wallets/{account}/meters", "wallets", Limit.ANALYTICS)
async def meters_by_wallet(
    request: Request,
    account: Annotated[str, Path(max_length=200)],
    who: WalletsReader,
) -> WalletMeters:
    """The meters currently linked to a CAIP-10 account."""
    parsed = AccountId.parse(account)
    meters = await _blocking(
        _services(request).settings, lambda c: wallets.meters_of_wallet(c, parsed)
    )
    return WalletMeters(account=str(parsed), meters=meters)


@_route("POST", "/api/meters/{meter_id}/link-wallet", "wallets", Limit.AUTH)
async def link_wallet(
    request: Request,
    meter_id: MeterIdPath,
    body: LinkRequest,
    who: WalletLinker,
) -> ChallengeOut:
    """A single-use challenge: the document the wallet and the meter both sign."""
    _own_meter(who, meter_id)
    account = AccountId.parse(body.account)
    challenge = await _blocking(
        _services(request).settings, lambda c: wallets.issue_link_challenge(c, meter_id, account)
    )
    return ChallengeOut(
        challenge_id=challenge.id, account=challenge.account, meter_id=challenge.meter_id,
        document=challenge.document, expires_at=challenge.expires_at,
    )  # fmt: skip


@_route("POST", "/api/meters/{meter_id}/verify-ownership", "wallets", Limit.AUTH)
async def verify_ownership(
    request: Request,
    meter_id: MeterIdPath,
    proof: OwnershipProof,
    who: WalletLinker,
) -> LinkOut:
    """Both signatures over the challenge's document: the wallet becomes the owner."""
    _own_meter(who, meter_id)
    account = AccountId.parse(proof.account)
    link = await _blocking(
        _services(request).settings,
        lambda c: wallets.link_wallet(
            c, meter_id=meter_id, account=account, challenge_id=proof.challenge_id,
            wallet_signature=proof.wallet_signature, meter_kid=proof.meter_kid,
            meter_signature=proof.meter_signature,
        ),
    )  # fmt: skip
    return LinkOut(meter_id=link.meter_id, account=link.account, linked_at=link.linked_at)


class StatusChangeIn(BaseModel):
    reason: str = Field(min_length=1, max_length=200, description="recorded in the event")


class StatusChangeOut(BaseModel):
    meter_id: str
    previous: str
    status: str
    changed: bool


class SecurityEventOut(BaseModel):
    id: int
    type: str
    severity: str
    detail: dict[str, Any]
    at: datetime


class SecurityStatus(BaseModel):
    meter_id: str
    status: str
    security_level: str
    events: list[SecurityEventOut] = Field(description="newest first")


async def _set_status(
    request: Request,
    meter_id: str,
    status: MeterStatus,
    reason: str,
    *,
    only_from: MeterStatus | None = None,
) -> StatusChangeOut:
    """`repository.set_status` (with `only_from`: only from that status, under the row's
    lock; from another, nothing changes and the answer names the status it has)."""
    change = await _blocking(
        _services(request).settings,
        lambda c: repository.set_status(c, meter_id, status, reason=reason, only_from=only_from),
    )
    if only_from is not None and change.old is not only_from:
        log.warning("meter_status_not_set", meter_id=meter_id, status=change.old, wanted=status,
                    only_from=only_from, via="api")  # fmt: skip
    else:
        log.info("meter_status_set", meter_id=meter_id, old=change.old, new=change.new, via="api")
    return StatusChangeOut(
        meter_id=meter_id, previous=change.old.value, status=change.new.value,
        changed=change.changed,
    )  # fmt: skip


@_route("POST", "/api/meters/{meter_id}/decommission", "registry", Limit.AUTH)
async def decommission(
    request: Request, meter_id: MeterIdPath, body: StatusChangeIn, who: RegistryWriter
) -> StatusChangeOut:
    """Operators: the meter's readings are refused from now on, for good."""
    return await _set_status(request, meter_id, MeterStatus.DECOMMISSIONED, body.reason)


@_route("POST", "/api/meters/{meter_id}/quarantine", "registry", Limit.AUTH)
async def quarantine(
    request: Request, meter_id: MeterIdPath, body: StatusChangeIn, who: RegistryWriter
) -> StatusChangeOut:
    """Operators: refuse the meter's readings until it is set active again (the
    workers' key caches hear of it within a second)."""
    return await _set_status(request, meter_id, MeterStatus.QUARANTINED, body.reason)


@_route("GET", "/api/meters/{meter_id}/security/status", "registry", Limit.STATUS)
async def security_status(
    request: Request,
    meter_id: MeterIdPath,
    who: RegistryReader,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> SecurityStatus:
    """The meter's status and its latest security events: operators, or the meter."""
    _own_meter(who, meter_id)

    def read(conn: psycopg.Connection[Any]) -> SecurityStatus | None:
        record = repository.fetch_meter(conn, meter_id)
        if record is None:
            return None
        events = repository.recent_events(conn, meter_id, limit=limit)
        return SecurityStatus(
            meter_id=meter_id, status=record.status.value,
            security_level=record.security_level.value,
            events=[SecurityEventOut(id=e.id, type=e.type, severity=e.severity.value,
                                     detail=e.detail, at=e.at) for e in events],
        )  # fmt: skip

    found = await _blocking(_services(request).settings, read)
    if found is None:
        raise ApiError(404, "unknown_meter", f"no meter {meter_id}")
    return found


class NewMeterIn(BaseModel):
    meter_id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    alg: str = Field(max_length=16, description="EdDSA, ES256, RS256 or PS256")
    public_key_pem: str = Field(max_length=4096, description="the reading-signing key")
    security_level: SecurityLevel = SecurityLevel.STANDARD
    serial: str | None = Field(default=None, max_length=200)
    manufacturer: str | None = Field(default=None, max_length=200)
    model: str | None = Field(default=None, max_length=200)
    firmware_version: str | None = Field(default=None, max_length=200)


class Registered(BaseModel):
    meter: MeterRecord
    registration_token: str = Field(
        description="for the meter's first key proof (auth/challenge), which activates it"
    )
    expires_in: int


class KeyProof(BaseModel):
    challenge: str = Field(max_length=2000, description="from GET auth/challenge")
    kid: str = Field(max_length=64)
    signature: str = Field(max_length=2000, description="base64url, over the challenge's bytes")
    registration_token: str | None = Field(default=None, max_length=2000)


class ChallengeIssued(BaseModel):
    challenge: str = Field(description="sign these exact UTF-8 bytes with a registered key")
    expires_in: int


class AuthStatus(BaseModel):
    meter_id: str
    status: str
    accepts_readings: bool


@_route("POST", "/api/meters", "registry", Limit.AUTH, status_code=201)
async def register(request: Request, body: NewMeterIn, who: RegistryWriter) -> Registered:
    """Operators: the meter is registered `pending_registration` with its signing key; it
    becomes active when it first proves that key (auth/challenge) with the token."""
    meter = NewMeter(
        body.meter_id, NewKey.parse(body.alg, body.public_key_pem),
        status=MeterStatus.PENDING_REGISTRATION, security_level=body.security_level,
        serial=body.serial, manufacturer=body.manufacturer, model=body.model,
        firmware_version=body.firmware_version,
    )  # fmt: skip
    settings = _services(request).settings

    def write(conn: psycopg.Connection[Any]) -> MeterRecord | None:
        repository.register(conn, [meter])
        return repository.fetch_meter(conn, meter.meter_id)

    record = await _blocking(settings, write)
    assert record is not None, "registered in the transaction just committed"
    tokens: Tokens = request.app.state.tokens
    token = tokens.sign(_REGISTRATION, meter.meter_id, _REGISTRATION_TTL_S)
    log.info("meter_registered", meter_id=meter.meter_id, by=who.name, via="api")
    return Registered(meter=record, registration_token=token, expires_in=_REGISTRATION_TTL_S)


@_route("GET", "/api/meters/{meter_id}/auth/challenge", "registry", Limit.AUTH)
async def auth_challenge(
    request: Request, meter_id: MeterIdPath, who: MeterCaller
) -> ChallengeIssued:
    """The meter itself: a short-lived challenge to sign with a registered key."""
    _own_meter(who, meter_id)
    tokens: Tokens = request.app.state.tokens
    challenge = tokens.sign(_KEY_PROOF, meter_id, _CHALLENGE_TTL_S, nonce=uuid4().hex)
    return ChallengeIssued(challenge=challenge, expires_in=_CHALLENGE_TTL_S)


@_route("POST", "/api/meters/{meter_id}/auth/challenge", "registry", Limit.AUTH)
async def prove_key(
    request: Request, meter_id: MeterIdPath, proof: KeyProof, who: MeterCaller
) -> AuthStatus:
    """The meter proves it holds a registered signing key; a meter pending registration
    (with its registration token) becomes active."""
    _own_meter(who, meter_id)
    services = _services(request)
    tokens: Tokens = request.app.state.tokens
    if tokens.check(proof.challenge, _KEY_PROOF, what="challenge")["sub"] != meter_id:
        raise ApiError(403, "wrong_challenge", "the challenge was issued to another meter")
    found = (await reads.read(services.pool, lambda c: fetch_snapshots(c, [meter_id]))).get(
        meter_id
    )
    key = next((k for k in found.keys if k.kid == proof.kid), None) if found else None
    if found is None or key is None or not key.valid_at(wall_ms()):
        raise ApiError(403, "unknown_kid", f"{meter_id} has no key {proof.kid!r} valid now")
    try:
        signature = b64url_decode(proof.signature.strip())
    except ValueError:
        raise ApiError(403, "bad_meter_signature", "the signature is not base64url") from None
    if not key.key.verify(signature, proof.challenge.encode()):
        raise ApiError(403, "bad_meter_signature", f"key {proof.kid!r} did not sign this")
    status = MeterStatus(found.status)
    if status is MeterStatus.PENDING_REGISTRATION:
        if proof.registration_token is None:
            raise ApiError(403, "registration_token_required", "a pending meter needs it")
        claims = tokens.check(proof.registration_token, _REGISTRATION, what="registration")
        if claims["sub"] != meter_id:
            raise ApiError(403, "wrong_registration", "the token registers another meter")
        # Only from the status read above: an operator's quarantine (or decommission)
        # since then stands, and the answer is the meter's status as it now is, as if it
        # had come before the read.
        changed = await _set_status(request, meter_id, MeterStatus.ACTIVE, "proved its key",
                                    only_from=MeterStatus.PENDING_REGISTRATION)  # fmt: skip
        status = MeterStatus(changed.status)
    return AuthStatus(meter_id=meter_id, status=status, accepts_readings=status in ACCEPTING)


@_route("GET", "/api/meters/{meter_id}/auth/status", "registry", Limit.STATUS)
async def auth_status(request: Request, meter_id: MeterIdPath, who: RegistryReader) -> AuthStatus:
    """Whether the meter is registered and accepted: operators, or the meter itself."""
    _own_meter(who, meter_id)
    record = await _blocking(
        _services(request).settings, lambda c: repository.fetch_meter(c, meter_id)
    )
    if record is None:
        raise ApiError(404, "unknown_meter", f"no meter {meter_id}")
    return AuthStatus(
        meter_id=meter_id, status=record.status, accepts_readings=record.accepts_readings
    )


class RollupOut(BaseModel):
    start_ms: int = Field(description="the interval is [start_ms, start_ms + width)")
    import_wh: int
    export_wh: int
    readings: int = Field(description="readings whose ts is in the interval")


class Rollups(BaseModel):
    meter_id: str
    width: Width
    rollups: list[RollupOut]


@_route(
    "GET", "/api/meters/{meter_id}/rollups", "readings", Limit.ANALYTICS, response_model=Rollups
)
async def meter_rollups(
    request: Request,
    meter_id: MeterIdPath,
    who: ReadingsReader,
    *,
    width: Width = Width.QUARTER,
    from_ms: Annotated[int, Query(alias="from", ge=0, le=_MAX_MS)],
    to_ms: Annotated[int, Query(alias="to", ge=0, le=_MAX_MS)],
) -> Response:
    """Energy imported and exported per interval (15m, 1h, 1d) from register differences,
    from the rollups kept with every stored batch (db/rollups.py), never from raw
    readings. Intervals starting in [from, to), at most 366 days. An integrator sees an
    interval only when its consents show the whole of it: the policy's refusals answer
    403 as in history, and one only partly inside the consented period is left out."""
    if not 0 < to_ms - from_ms <= _MAX_ROLLUP_MS:
        raise ApiError(422, "invalid_period", "to must be after from, by at most 366 days")
    services = _services(request)
    async with reads.connection(services.lagging) as conn:
        found = await rollups_json(conn, meter_id, width, _utc(from_ms), _utc(to_ms))
    intervals = [text for _, text in found]
    if who.role is not Role.OPERATOR:  # the policy, per interval (a meter: its own only)
        starts = [start for start, _ in found]
        visible = _visible(services, who, meter_id, starts, empty_at=from_ms)
        if who.role is Role.INTEGRATOR:
            visible = _whole_intervals(
                services, who, meter_id, starts, visible=visible, width=width
            )
        intervals = [text for text, shown in zip(intervals, visible, strict=True) if shown]
    # Rendered by PostgreSQL (db/rollups.py): a month of quarters is 2,880 intervals.
    head = orjson.dumps({"meter_id": meter_id, "width": width})[:-1]
    body = head + b',"rollups":[' + ",".join(intervals).encode() + b"]}"
    return Response(body, media_type="application/json")


def _whole_intervals(
    services: Services,
    who: Principal,
    meter_id: str,
    starts: list[int],
    *,
    visible: list[bool],
    width: Width,
) -> list[bool]:
    """Of the intervals the policy allows at their start, those whose every time it allows:
    an interval's energy is one number, so one that the consented period cuts would show
    energy from outside it. `seen_range` is exact: the range it names is all allowed."""
    step, now = width.ms, wall_ms()
    return [
        shown
        and seen_range(
            who.name, meter_id, start, start + step, ConsentScope.HISTORY,
            view=services.audience.view, now_ms=now,
        ) == (start, start + step)
        for start, shown in zip(starts, visible, strict=True)
    ]  # fmt: skip


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class LedgerEntries(BaseModel):
    entries: list[dict[str, Any]] = Field(description="oldest first, as `ledger show` prints them")


class LedgerBalance(BaseModel):
    wallet: str | None = Field(description="null: GRID minted to meters without a wallet")
    grid_units: str = Field(description="decimal string: units exceed JSON's safe integers")
    last_entry: int


class LedgerBalances(BaseModel):
    balances: list[LedgerBalance]


@_route("GET", "/api/ledger/entries", "ledger", Limit.ANALYTICS, also=["public"])
async def ledger_entries(
    request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> LedgerEntries:
    """Unauthenticated: the newest anchored ledger entries with their mints."""
    found = await _blocking(
        _services(request).settings, lambda c: ledger.recent_entries(c, limit=limit)
    )
    return LedgerEntries(
        entries=[{**entry_json(r.entry), "recorded_at_ms": r.recorded_at_ms} for r in found]
    )


@_route("GET", "/api/ledger/balances", "ledger", Limit.ANALYTICS, also=["public"])
async def ledger_balances(request: Request) -> LedgerBalances:
    """Unauthenticated: GRID per wallet, largest first."""
    found = await _blocking(_services(request).settings, ledger.balances)
    return LedgerBalances(
        balances=[LedgerBalance(wallet=b.wallet, grid_units=str(b.grid_units),
                                last_entry=b.last_entry) for b in found]
    )  # fmt: skip


@_route("GET", "/api/ledger/proofs/{reading_hash}", "ledger", Limit.ANALYTICS)
async def ledger_proof(
    request: Request,
    reading_hash: Annotated[str, Path(pattern="^[0-9a-f]{64}$")],
    who: LedgerReader,
) -> dict[str, Any]:
    """A stored reading's RFC 6962 inclusion proof and the signed entry committing to it
    (checkable offline: bridge/proof.py). An integrator's passes the consent policy with
    scope `ledger`."""
    services = _services(request)
    digest = bytes.fromhex(reading_hash)
    found = await reads.owner_of(services.pool, digest)
    if found is None:
        raise ApiError(404, "unknown_reading", f"no stored reading {reading_hash}")
    refusal = _consented(services, who, *found, scope=ConsentScope.LEDGER)
    if refusal is not None:
        raise refusal
    try:
        proof: dict[str, Any] = await _blocking(services.settings, lambda c: build_proof(c, digest))
    except ProofError as exc:
        raise ApiError(404, "not_anchored", first_line(exc)) from None
    return proof


@router.websocket("/api/meters/{meter_id}/stream/energy")
async def stream_energy(websocket: WebSocket, meter_id: MeterIdPath) -> None:
    """The meter's readings as they are stored (api/stream.py)."""
    await stream.energy(websocket, meter_id)


@router.websocket("/api/meters/{meter_id}/stream/status")
async def stream_status(websocket: WebSocket, meter_id: MeterIdPath) -> None:
    """The meter's registry status, then each change (api/stream.py)."""
    await stream.status(websocket, meter_id)


@router.websocket("/api/meters/{meter_id}/stream/alerts")
async def stream_alerts(websocket: WebSocket, meter_id: MeterIdPath) -> None:
    """The meter's security events as they are recorded (api/stream.py)."""
    await stream.alerts(websocket, meter_id)


def create_app(settings: ApiSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services(settings)
        app.state.services = services
        app.state.tokens = Tokens(settings)
        app.state.limiter = Limiter(settings)
        for pool in services.pools():
            await pool.open()
        stop = asyncio.Event()
        consents = asyncio.create_task(services.audience.run(stop), name="consent-view")
        worker = asyncio.create_task(services.worker.run(), name="submissions")
        renderer = pages.Renderer(
            services.pool, interval_s=settings.api_pages_interval_s,
            grace_s=settings.api_pages_grace_s, batch=settings.api_pages_batch,
            csv=settings.api_pages_csv,
        )  # fmt: skip
        rendering = asyncio.create_task(renderer.run(stop), name="history-pages")
        republisher = services.republisher
        republishing = (
            None if republisher is None
            else asyncio.create_task(republisher.run(stop), name="republish")
        )  # fmt: skip
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(services.audience.loaded.wait(), 10)
        log.info("api_started", port=settings.api_port)
        try:
            yield
        finally:
            stop.set()
            services.worker.stopping.set()
            await asyncio.gather(consents, worker, rendering, return_exceptions=True)
            if republishing is not None:
                await asyncio.gather(republishing, return_exceptions=True)
            for pool in services.pools():
                await pool.close()

    app = FastAPI(
        title="meterproof",
        version="1",
        summary="Signed smart-meter readings: submissions, reads, wallet links (docs/api.md)",
        lifespan=lifespan,
    )
    install(app)
    app.add_middleware(Edge, max_body_bytes=settings.api_max_body_bytes)

    app.include_router(router)
    from meterproof.api.provider import router as providers  # it imports this module

    app.include_router(providers)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated document, with every error answer documented as the problem body
    it is (FastAPI would describe its own validation error shape)."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        content = {PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for operations in document["paths"].values():
            for operation in operations.values():
                answers = operation.setdefault("responses", {})
                for code in _PROBLEMS:
                    answers[str(code)] = {"description": _REASONS[code], "content": content}
        app.openapi_schema = document
    return app.openapi_schema
