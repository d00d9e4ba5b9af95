"""Who is calling: a meter by its client certificate, an operator or an integrator by a
short-lived bearer token from the OAuth2 client-credentials endpoint.

Tokens are HS256 JWTs signed with the server's key (`ApiSettings.token_key`), naming the
client (`sub`), its role and its scopes; they are checked on every request, and an
integrator's reads also pass the consent policy, which refuses a revoked integrator at
once, whatever its token says. A meter is the CN of a client certificate the operator CA
issued, verified by the TLS handshake: the same binding as on the broker.

A WebSocket stream outlives the check at its start, so it asks `still_valid` on every
tick, which refuses a token past its `exp` and a meter certificate the operator has
revoked since (the index `api.server` reads)."""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import Callable, Collection, Container, Coroutine, MutableMapping
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import Any, Final
from urllib.parse import parse_qs

import jwt
import psycopg
from fastapi import Depends, Request
from fastapi.openapi.models import OAuthFlowClientCredentials, OAuthFlows
from fastapi.security import OAuth2
from pydantic import BaseModel

from meterproof.api.errors import ApiError
from meterproof.api.settings import ApiSettings
from meterproof.consent.repository import secret_digest
from meterproof.db.connect import connect_async
from meterproof.db.silence import bounded, cut, deadline
from meterproof.errors import UnavailableError

ISSUER: Final = "meterproof"
AUDIENCE: Final = "meterproof-api"
OPERATOR: Final = "operator"
TOKEN_PATH: Final = "/api/auth/token"  # noqa: S105 - a path, not a secret
#: The state key the TLS protocol puts a verified client certificate's CN under.
PEER_CN: Final = "tls_peer_cn"
#: ... and the CN of a certificate the CA's revoked index lists.
PEER_REVOKED: Final = "tls_peer_revoked"
#: ... the verified certificate's serial (lower-case hex, no leading zeros), and the
#: revoked index (a `Container[str]` of such serials, reread when it changes), so a
#: connection that outlives a revocation can ask again (`still_valid`).
PEER_SERIAL: Final = "tls_peer_serial"
REVOKED_SERIALS: Final = "tls_revoked_serials"
#: The state key of the bearer token a request was verified as: the rate limiter and
#: the route's dependency both need it, and it is verified once (`bearer_principal`).
_VERIFIED: Final = "verified_bearer"


class Role(StrEnum):
    OPERATOR = "operator"
    INTEGRATOR = "integrator"
    METER = "meter"


class Scope(StrEnum):
    READINGS = "readings:read"  #: history, latest (integrators: through the consent policy)
    METERS = "meters:read"  #: the registry's records, meters by wallet
    METERS_WRITE = "meters:write"  #: register, decommission, quarantine
    WALLETS = "wallets:link"  #: wallet-link challenges and proofs


#: What each client may ask for; a token carries what it asked for, all of it by default.
GRANTABLE: Final = {
    Role.OPERATOR: frozenset(Scope),
    Role.INTEGRATOR: frozenset({Scope.READINGS}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    name: str
    scopes: frozenset[str]
    #: The token's `exp` (unix s); None for a meter's certificate.
    expires_s: int | None = None


class Token(BaseModel):
    """RFC 6749 section 5.1."""

    access_token: str
    token_type: str = "Bearer"  # noqa: S105 - the RFC 6750 type name
    expires_in: int
    scope: str


#: Declares the flow in the OpenAPI document; the header is read by `authenticate`.
bearer = OAuth2(
    flows=OAuthFlows(
        clientCredentials=OAuthFlowClientCredentials(
            tokenUrl=TOKEN_PATH, scopes={s.value: s.name.lower() for s in Scope}
        )
    ),
    auto_error=False,
)


class Tokens:
    def __init__(self, settings: ApiSettings) -> None:
        self._settings = settings
        self._key = settings.token_key()

    async def issue(self, body: bytes, content_type: str) -> Token:
        """Client credentials from a form body (RFC 6749 section 4.4): the operator's secret
        from settings, or an integrator's secret against its stored digest."""
        if not content_type.startswith("application/x-www-form-urlencoded"):
            raise ApiError(415, "unsupported_media_type", "send application/x-www-form-urlencoded")
        try:
            form = {k: v[0] for k, v in parse_qs(body.decode(), strict_parsing=False).items()}
        except UnicodeDecodeError:
            raise ApiError(400, "invalid_request", "the form is not UTF-8") from None
        if form.get("grant_type") != "client_credentials":
            raise ApiError(400, "unsupported_grant_type", "grant_type must be client_credentials")
        client, secret = form.get("client_id", ""), form.get("client_secret", "")
        role = await self._authenticate_client(client, secret)
        requested = set(form.get("scope", "").split()) or set(GRANTABLE[role])
        if not requested <= GRANTABLE[role]:
            raise ApiError(400, "invalid_scope", f"{role} clients may ask for {_names(role)}")
        ttl = self._settings.api_token_ttl_s
        scope = " ".join(sorted(requested))
        token = self.sign(AUDIENCE, client, ttl, role=role.value, scope=scope)
        return Token(access_token=token, expires_in=ttl, scope=scope)

    def sign(self, audience: str, subject: str, ttl_s: int, **claims: str) -> str:
        """A JWT of this server for `audience` (access, registration, meter challenge)."""
        now = int(time.time())
        return jwt.encode(
            {"iss": ISSUER, "aud": audience, "sub": subject, "iat": now, "exp": now + ttl_s,
             "jti": uuid.uuid4().hex, **claims},
            self._key, algorithm="HS256",
        )  # fmt: skip

    def check(self, token: str, audience: str, *, what: str) -> dict[str, Any]:
        """The claims of a JWT this server signed for `audience`; 401 `<what>_expired` or
        `invalid_<what>` otherwise."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self._key, algorithms=["HS256"], audience=audience, issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "aud", "iss"]},
            )  # fmt: skip
        except jwt.ExpiredSignatureError:
            raise ApiError(
                401, f"{what}_expired", f"the {what} expired", headers=_CHALLENGE
            ) from None
        except jwt.InvalidTokenError as exc:
            raise ApiError(401, f"invalid_{what}", str(exc), headers=_CHALLENGE) from None
        return claims

    async def _authenticate_client(self, client: str, secret: str) -> Role:
        operator = self._settings.api_operator_secret
        if client == OPERATOR:
            if operator is not None and hmac.compare_digest(
                secret.encode(), operator.get_secret_value().encode()
            ):
                return Role.OPERATOR
            raise ApiError(401, "invalid_client", "unknown client or wrong secret")
        row = await _integrator_secret(
            self._settings.database_url, client, within_s=self._settings.database_timeout_s
        )
        if row is None or not hmac.compare_digest(bytes(row[0]), secret_digest(secret)):
            raise ApiError(401, "invalid_client", "unknown client or wrong secret")
        if row[1] != "active":
            raise ApiError(401, "integrator_revoked", f"integrator {client} is revoked")
        return Role.INTEGRATOR

    def principal(self, token: str) -> Principal:
        claims = self.check(token, AUDIENCE, what="token")
        try:
            return Principal(
                Role(claims["role"]), str(claims["sub"]), frozenset(str(claims["scope"]).split()),
                expires_s=int(claims["exp"]),
            )  # fmt: skip
        except (KeyError, ValueError) as exc:
            raise ApiError(401, "invalid_token", str(exc), headers=_CHALLENGE) from None


_CHALLENGE: Final = {"WWW-Authenticate": 'Bearer realm="meterproof"'}


def _names(role: Role) -> str:
    return " ".join(sorted(GRANTABLE[role]))


async def _integrator_secret(
    database_url: str, name: str, *, within_s: float
) -> tuple[bytes, str] | None:
    """The integrator's secret digest and status; a server silent for `within_s` is 503."""
    url = bounded(database_url, within_s)
    try:
        async with await connect_async(url, autocommit=True) as conn:
            with deadline(within_s=within_s, cut_off=partial(cut, conn), wait="api_request"):
                cur = await conn.execute(
                    "SELECT secret_sha256, status FROM integrators WHERE name = %s", (name,)
                )
                row = await cur.fetchone()
    except psycopg.Error as exc:
        raise UnavailableError("database", f"integrator lookup: {exc}") from exc
    return None if row is None else (bytes(row[0]), str(row[1]))


def identify(
    tokens: Tokens,
    scope: MutableMapping[str, Any],
    authorization: str | None,
    roles: Collection[Role],
    needed: Scope | None,
) -> Principal:
    """The caller of an HTTP request or a WebSocket (its ASGI `scope`): a bearer token,
    else a meter certificate's CN; refused unless one of `roles`, with `needed`."""
    if authorization:
        who = bearer_principal(tokens, scope, authorization)
    elif isinstance(cn := scope.get("state", {}).get(PEER_CN), str):
        who = Principal(Role.METER, cn, frozenset())
    elif PEER_REVOKED in scope.get("state", {}):
        raise ApiError(401, "certificate_revoked", "the client certificate is revoked")
    else:
        raise ApiError(
            401, "unauthenticated", "a bearer token or a meter certificate is required",
            headers=_CHALLENGE,
        )  # fmt: skip
    if who.role not in roles:
        raise ApiError(403, "wrong_client", f"{who.role} clients may not call this")
    if needed is not None and who.role is not Role.METER and needed not in who.scopes:
        raise ApiError(403, "insufficient_scope", f"the token lacks scope {needed}")
    return who


def bearer_principal(
    tokens: Tokens, scope: MutableMapping[str, Any], authorization: str
) -> Principal:
    """The caller an `Authorization: Bearer <token>` value names, verified once per request
    (kept in the request's state: the rate limiter asks before the route's dependency);
    401 `invalid_token` or `token_expired` otherwise."""
    state = scope.setdefault("state", {})
    verified = state.get(_VERIFIED)
    if verified is not None and verified[0] == authorization:
        who: Principal = verified[1]
        return who
    kind, _, token = authorization.partition(" ")
    if kind.lower() != "bearer" or not token:
        raise ApiError(
            401, "invalid_token", "use Authorization: Bearer <token>", headers=_CHALLENGE
        )
    who = tokens.principal(token.strip())
    state[_VERIFIED] = (authorization, who)
    return who


def still_valid(who: Principal, scope: MutableMapping[str, Any]) -> None:
    """Refuse a caller identified earlier on this connection (a WebSocket stream) whose
    credentials no longer hold: 401 `token_expired` once its token's `exp` has passed (as
    `Tokens.check` would answer a request now), 401 `certificate_revoked` once the operator
    has revoked its meter certificate (as a new connection would be answered)."""
    if who.expires_s is not None and time.time() >= who.expires_s:
        raise ApiError(401, "token_expired", "the token expired", headers=_CHALLENGE)
    if who.role is Role.METER:
        state = scope.get("state", {})
        revoked: Container[str] | None = state.get(REVOKED_SERIALS)
        serial = state.get(PEER_SERIAL)
        if revoked is not None and isinstance(serial, str) and serial in revoked:
            raise ApiError(401, "certificate_revoked", "the client certificate is revoked")


def require(
    *roles: Role, scope: Scope | None = None
) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency: the caller, if it is one of `roles` (with `scope` for token holders)."""

    async def dependency(
        request: Request, authorization: str | None = Depends(bearer)
    ) -> Principal:
        return identify(request.app.state.tokens, request.scope, authorization, roles, scope)

    return dependency
