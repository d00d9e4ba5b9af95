"""Seed 003's provider endpoints: registration, signed reading submission, and the kept
signed bytes of a stored provider reading for whoever re-verifies it.

A submission is judged by the API's in-process ingest worker like any other (decode,
verify, replay, judge, store: `ingest.decode` and `ingest.verify` know the provider
format, `api.provider_store` keeps its signed bytes); this module only parses enough of
the body to know its meter and provider (for the receipt's queue and the rate limit) and
turns the receipt into seed 003's answer. Statuses are the seed's (202, 400, 422, 429;
409 for a taken registration); the problem's `code` is the pipeline's reason code, the
one logged and counted; `error` and `reason` add the seed's names (docs/api.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final

import psycopg
from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel, Field, ValidationError

from meterproof.api import reads
from meterproof.api.app import LedgerReader, RegistryWriter, _blocking, _consented, _services
from meterproof.api.errors import ApiError
from meterproof.api.limits import Limit, Limiter, limited, peer
from meterproof.api.submit import receipts
from meterproof.consent.model import Scope as ConsentScope
from meterproof.registry import providers
from meterproof.schemas import provider
from meterproof.schemas.codec import MalformedPayload
from meterproof.schemas.reading import Receipt, ReceiptStatus, RejectReason

router = APIRouter(tags=["providers"])
_HASH: Final = r"^(0x)?[0-9a-f]{64}$"

#: Each pipeline reason as seed 003 answers it: (status, seed error, seed reason).
SEED_ANSWERS: Final[dict[RejectReason, tuple[int, str, str | None]]] = {
    RejectReason.MALFORMED: (400, "malformed_request", None),
    RejectReason.TOPIC_MISMATCH: (400, "malformed_request", None),
    RejectReason.UNKNOWN_METER: (422, "provider_inactive", "unregistered"),
    RejectReason.METER_NOT_ACTIVE: (422, "provider_inactive", "inactive"),
    RejectReason.UNSUPPORTED_ALG: (422, "signature_verification_failed", "key_not_found"),
    RejectReason.BAD_SIGNATURE: (422, "signature_verification_failed", "verification_failed"),
    RejectReason.TIMESTAMP_SKEW: (422, "timestamp_skew", None),
    RejectReason.STALE_READING: (422, "timestamp_skew", None),
    RejectReason.SEQ_REUSED: (422, "nonce_reused", None),
    RejectReason.REGISTER_DECREASED: (422, "meter_anomaly", "total_kwh_decreased"),
    RejectReason.RATE_LIMITED: (429, "rate_limited", None),
    RejectReason.STORE_REFUSED: (422, "meter_anomaly", "store_refused"),
}


class ProviderRegistered(BaseModel):
    """Seed 003's answer to a registration."""

    provider_id: str
    status: str = Field(description="its meter's registry status: active")
    registered_at: int = Field(description="unix epoch seconds")
    stake_amount_ct: int
    reputation_score: float = Field(description="seed 003's starting score; not tracked yet")


class ReadingSubmitted(BaseModel):
    """Seed 003's answer to an accepted reading, and the receipt a meter gets over MQTT."""

    reading_hash: str = Field(description="0x + the reading-v1 reading_hash, the ledger's leaf")
    credit_amount_kwh: int = Field(
        description="the increase of total_kwh over the meter's stored reading before it"
    )
    status: str = Field(description="pending_settlement: stored, anchored with its epoch")
    receipt: Receipt


class KeptReading(BaseModel):
    """What a third party needs to re-verify a provider reading without trusting us:
    Ed25519-verify `signature` over `signed_bytes` with `public_key`, check that
    `signed_bytes` is seed 003's message of the fields shown, map them to reading-v1
    (docs/api.md) and recompute `reading_hash`, then follow it with the ledger proof."""

    reading_hash: str
    provider_id: str
    meter_address: str
    total_kwh: int
    timestamp: int
    nonce: int
    signed_bytes: str = Field(description="base64 of the exact bytes the provider signed")
    signature: str = Field(description="base64 Ed25519 signature")
    public_key: str = Field(description="base64 Ed25519 public key registered for it")


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


@router.post(
    "/energy/provider/register",
    status_code=201,
    dependencies=[Depends(limited(Limit.AUTH))],
    openapi_extra=_body_schema(provider.ProviderRegistration),
)
async def register_provider(request: Request, who: RegistryWriter) -> ProviderRegistered:
    """Operators (scope meters:write): register a provider and its meter, active, with
    its Ed25519 key; `signature` proves the registrant holds that key (over
    `schemas.provider.registration_bytes`)."""
    try:
        body = provider.ProviderRegistration.model_validate_json(await request.body())
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise ApiError(400, "invalid_request", f"{where}: {err['msg']}",
                       error="invalid_provider_data") from None  # fmt: skip
    if not provider.registration_verifies(body):
        raise ApiError(422, RejectReason.BAD_SIGNATURE.value, "the registration is not signed "
                       "by its public_key", error="signature_verification_failed",
                       reason="verification_failed")  # fmt: skip
    try:
        found = await _blocking(
            _services(request).settings, lambda c: providers.register(c, body, by=who.name)
        )
    except providers.ProviderExistsError as exc:
        raise ApiError(409, exc.code, str(exc), error="provider_exists") from None
    return ProviderRegistered(
        provider_id=found.provider_id, status=found.status,
        registered_at=int(found.registered_at.timestamp()),
        stake_amount_ct=found.stake_amount_ct, reputation_score=0.5,
    )  # fmt: skip


@router.post(
    "/energy/reading/submit",
    status_code=202,
    openapi_extra=_body_schema(provider.ProviderReading),
)
async def submit_reading(request: Request, response: Response) -> ReadingSubmitted:
    """A provider's signed reading, judged by the ingest pipeline and answered after its
    commit. The signature is the authentication (seed 003): no token or certificate. The
    body's provider id is only a claim until then, so the rate limit counts per client
    address first, then per provider id; the answer's headers are the tighter window's."""
    limiter: Limiter = request.app.state.limiter
    by_address = _take(limiter, Limit.PROVIDER_ADDRESS, peer(request))
    body = await request.body()
    try:
        reading = provider.parse(body)
    except MalformedPayload as exc:
        raise ApiError(400, RejectReason.MALFORMED.value, str(exc),
                       error="malformed_request") from None  # fmt: skip
    by_provider = _take(limiter, Limit.PROVIDER, f"provider:{reading.provider_id}")
    response.headers.update(min(by_address, by_provider, key=_remaining))
    services = _services(request)
    meter = reading.meter_address
    (receipt,) = await receipts(
        services.source.submit(meter, [body], topic=provider.topic(meter)),
        services.settings.api_submit_timeout_s,
    )
    answer = receipt.model_dump(mode="json")
    if receipt.status is ReceiptStatus.DUPLICATE:
        raise ApiError(422, "duplicate", f"nonce {reading.nonce} was used by this same reading,"
                       " stored once", receipt=answer, error="nonce_reused",
                       reason="same_reading")  # fmt: skip
    if receipt.reason is not None:
        status, error, reason = SEED_ANSWERS[receipt.reason]
        raise ApiError(status, receipt.reason.value, "the reading was refused",
                       receipt=answer, error=error, reason=reason)  # fmt: skip
    credit = await reads.read(services.pool, lambda c: providers.credit_wh(c, meter, reading.nonce))
    return ReadingSubmitted(
        reading_hash=f"0x{receipt.reading_hash}",
        credit_amount_kwh=(credit or 0) // provider.WH_PER_KWH,
        status="pending_settlement",
        receipt=receipt,
    )


def _take(limiter: Limiter, kind: Limit, caller: str) -> dict[str, str]:
    """`Limiter.take`, its 429 carrying the seed's `error` name as every refusal here does."""
    try:
        return limiter.take(kind, caller)
    except ApiError as exc:
        exc.error = SEED_ANSWERS[RejectReason.RATE_LIMITED][1]
        raise


def _remaining(headers: Mapping[str, str]) -> int:
    return int(headers["X-RateLimit-Remaining"])


@router.get("/energy/reading/{reading_hash}", dependencies=[Depends(limited(Limit.ANALYTICS))])
async def kept_reading(
    request: Request,
    reading_hash: Annotated[str, Path(pattern=_HASH)],
    who: LedgerReader,
) -> KeptReading:
    """A stored provider reading as its provider signed it; like a ledger proof, an
    integrator's passes the consent policy with scope `ledger`."""
    services = _services(request)
    digest = bytes.fromhex(reading_hash.removeprefix("0x"))

    def read(conn: psycopg.Connection[Any]) -> providers.KeptReading | None:
        return providers.kept_reading(conn, digest)

    kept = await _blocking(services.settings, read)
    if kept is None:
        raise ApiError(404, "unknown_reading", f"no stored provider reading {reading_hash}")
    fields = provider.original_of(kept.signed_bytes, kept.provider_id, kept.meter_id)
    ts_ms = fields["timestamp"] * provider.MS_PER_S
    refusal = _consented(services, who, kept.meter_id, ts_ms, scope=ConsentScope.LEDGER)
    if refusal is not None:
        raise refusal
    return KeptReading(
        reading_hash=f"0x{kept.reading_hash.hex()}", provider_id=kept.provider_id,
        meter_address=kept.meter_id, **fields,
        signed_bytes=provider.b64encode(kept.signed_bytes),
        signature=provider.b64encode(kept.signature),
        public_key=provider.b64encode(kept.public_key),
    )  # fmt: skip
