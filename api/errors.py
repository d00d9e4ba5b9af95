"""One error body everywhere: RFC 9457 problem details, with a stable `code` (the
pipeline's reason codes, the consent policy's refusals, the registry's refusal codes) and
the request's `correlation_id`, which is also in the `X-Correlation-ID` header and in the
log line of the refusal. Seed 003's endpoints answer with the seed's statuses and add its
names as the extension members `error` and `reason` (api/provider.py); `code` stays ours.

Every refusal is logged and counted (`meterproof_api_refusals_total{code}`); anything
unexpected answers a bare 500 problem without a traceback and is logged with one."""

from __future__ import annotations

import re
import uuid
from typing import Any, Final

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from meterproof.api.telemetry import REFUSALS
from meterproof.errors import (
    ConflictError,
    InputError,
    MeterproofError,
    NotFoundError,
    UnavailableError,
    first_line,
)
from meterproof.registry.errors import RefusedError, StateError

log = structlog.get_logger("api")

PROBLEM_TYPE: Final = "application/problem+json"
CORRELATION_HEADER: Final = "X-Correlation-ID"
_CORRELATION_RE: Final = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
_STATUS_CODES: Final = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "too_large",
    415: "unsupported_media_type",
}


class Problem(BaseModel):
    """RFC 9457 problem details with meterproof's stable code."""

    type: str = Field(description="URI naming the problem type: `urn:meterproof:problem:<code>`")
    title: str
    status: int
    detail: str
    code: str = Field(description="stable reason code, the same as in logs and metrics")
    correlation_id: str = Field(description="also in the X-Correlation-ID header and the log")
    receipt: dict[str, Any] | None = Field(
        default=None, description="for a refused submission: the receipt a meter gets over MQTT"
    )
    error: str | None = Field(
        default=None, description="seed 003's error name, on its /energy endpoints only"
    )
    reason: str | None = Field(
        default=None, description="seed 003's reason, on its /energy endpoints only"
    )


class ApiError(MeterproofError):
    """A refusal with its HTTP status and stable code."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        receipt: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        error: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.receipt = receipt
        self.headers = headers or {}
        self.error = error
        self.reason = reason


def correlation_id(request: Request) -> str:
    """The caller's X-Correlation-ID when it is a sane token, else a new one; kept on the
    request so the answer, its log line and its problem body carry the same."""
    found = getattr(request.state, "correlation_id", None)
    if isinstance(found, str):
        return found
    given = request.headers.get(CORRELATION_HEADER, "")
    value = given if _CORRELATION_RE.fullmatch(given) else uuid.uuid4().hex
    request.state.correlation_id = value
    return value


def problem(request: Request, error: ApiError) -> JSONResponse:
    """The problem response of `error`; its refusal logged and counted."""
    cid = correlation_id(request)
    REFUSALS.labels(code=error.code).inc()
    log.warning(
        "request_refused",
        code=error.code,
        status=error.status,
        detail=error.detail,
        method=request.method,
        path=request.url.path,
        correlation_id=cid,
    )
    body = Problem(
        type=f"urn:meterproof:problem:{error.code}",
        title=error.code.replace("_", " "),
        status=error.status,
        detail=error.detail,
        code=error.code,
        correlation_id=cid,
        receipt=error.receipt,
        error=error.error,
        reason=error.reason,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=error.status,
        media_type=PROBLEM_TYPE,
        headers={CORRELATION_HEADER: cid, **error.headers},
    )


#: Errors raised below the API, most specific first: (type, status, code).
_TRANSLATED: Final = (
    (NotFoundError, 404, "not_found"),
    (ConflictError, 409, "conflict"),
    (InputError, 422, "invalid_input"),
)


def as_api_error(exc: MeterproofError) -> ApiError:
    """The status and code of an error raised below the API; a registry refusal (403) or
    state conflict (409) keeps its own code."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RefusedError):
        return ApiError(403, exc.code, first_line(exc))
    if isinstance(exc, StateError):
        return ApiError(409, exc.code, first_line(exc))
    if isinstance(exc, UnavailableError):
        return ApiError(503, "unavailable", f"{exc.dependency} did not answer; retry later")
    for kind, status, code in _TRANSLATED:
        if isinstance(exc, kind):
            return ApiError(status, code, first_line(exc))
    return ApiError(400, "refused", first_line(exc))


def install(app: FastAPI) -> None:
    """Route every error through `problem`."""

    async def on_meterproof(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, MeterproofError)
        return problem(request, as_api_error(exc))

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return problem(request, ApiError(422, "invalid_request", f"{where}: {first.get('msg')}"))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        return problem(request, ApiError(exc.status_code, code, str(exc.detail)))

    async def on_anything(request: Request, exc: Exception) -> JSONResponse:
        log.error("request_failed", path=request.url.path, exc_info=exc)
        return problem(request, ApiError(500, "internal", "the server failed; see its log"))

    app.add_exception_handler(MeterproofError, on_meterproof)
    app.add_exception_handler(Exception, on_anything)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
