"""Rate limits per class and caller, on a server started with small ones, and the bound
on submissions waiting for their commit."""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import Callable

import pytest
from fixtures.api import OPERATOR_SECRET, ApiServer, signed
from ingest_harness import provision

from meterproof.api.errors import ApiError
from meterproof.api.submit import HttpSource
from meterproof.ingest.source import Delivery
from meterproof.schemas.timestamps import wall_ms

AUTH_PER_MIN = 3
PROVIDER_ADDRESS_PER_MIN = 3


@pytest.fixture(scope="module")
def api_env() -> dict[str, str]:
    return {
        "METERPROOF_API_RATE_SUBMISSION_PER_MIN": "2",
        "METERPROOF_API_RATE_AUTH_PER_MIN": str(AUTH_PER_MIN),
        "METERPROOF_API_RATE_PROVIDER_ADDRESS_PER_MIN": str(PROVIDER_ADDRESS_PER_MIN),
    }


def test_submissions_are_limited_per_meter_with_headers(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    first, second = make_meter_id(), make_meter_id()
    key = provision(api_server.pki, api_server.database_url, first)
    provision(api_server.pki, api_server.database_url, second)
    now = wall_ms()
    payloads = [signed(first, key, seq, now + seq) for seq in (1, 2, 3)]
    with api_server.meter_client(first) as meter:
        answers = [meter.post(f"/api/meters/{first}/energy", content=p) for p in payloads]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["1", "0", "0"]
    assert {a.headers["x-ratelimit-limit"] for a in answers} == {"2"}
    refused = answers[2]
    assert refused.json()["code"] == "rate_limited"
    assert 0 < int(refused.headers["retry-after"]) <= 60
    with api_server.meter_client(second) as other:
        answer = other.post(f"/api/meters/{second}/energy", content=payloads[0])
    assert answer.status_code == 422, "another meter has its own window (and a topic mismatch)"
    assert answer.json()["code"] == "topic_mismatch"


def test_made_up_authorization_headers_do_not_escape_the_token_limit(
    api_server: ApiServer,
) -> None:
    """Guessing the operator's secret from one address, each try with another random
    Authorization header, is limited like any other try: the token endpoint counts per
    peer address whatever the request carries."""
    form = {"grant_type": "client_credentials", "client_id": "operator"}
    with api_server.client() as http:
        answers = [
            http.post("/api/auth/token", data={**form, "client_secret": secrets.token_hex(8)},
                      headers={"Authorization": f"Bearer {secrets.token_urlsafe(24)}"})
            for _ in range(AUTH_PER_MIN + 1)
        ]  # fmt: skip
    assert [a.status_code for a in answers] == [401] * AUTH_PER_MIN + [429]
    assert answers[-1].json()["code"] == "rate_limited"
    assert 0 < int(answers[-1].headers["retry-after"]) <= 60
    with api_server.client() as http:
        right = http.post("/api/auth/token", data={**form, "client_secret": OPERATOR_SECRET})
    assert right.status_code == 429, "the right secret waits too: the window is the address's"


def test_provider_submissions_are_limited_per_address_whatever_provider_they_name(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    """The provider id is the body's claim until the signature verifies: naming another
    one each time does not escape the limit of the address it comes from."""
    meter = make_meter_id()
    signature = base64.b64encode(bytes(64)).decode()
    with api_server.client() as http:
        answers = [
            http.post("/energy/reading/submit", json={
                "provider_id": f"prov-{secrets.token_hex(6)}", "meter_address": meter,
                "total_kwh": 1, "timestamp": wall_ms() // 1000, "nonce": n + 1,
                "signature": signature,
            })
            for n in range(PROVIDER_ADDRESS_PER_MIN + 1)
        ]  # fmt: skip
    assert [a.status_code for a in answers] == [422] * PROVIDER_ADDRESS_PER_MIN + [429]
    assert [a.json()["code"] for a in answers[:-1]] == ["unknown_meter"] * PROVIDER_ADDRESS_PER_MIN
    refused = answers[-1]
    assert (refused.json()["code"], refused.json()["error"]) == ("rate_limited", "rate_limited")
    assert refused.headers["x-ratelimit-limit"] == str(PROVIDER_ADDRESS_PER_MIN)


def test_submissions_waiting_for_their_commit_are_bounded() -> None:
    """Past `max_pending` readings without a receipt, a submission is refused 503
    `overloaded` with Retry-After before it reaches the worker; a receipt frees a place."""

    async def scenario() -> None:
        delivered: list[Delivery] = []
        source = HttpSource(max_pending=3)
        await source.start(delivered.append)
        first = source.submit("meter-a", [b"1", b"2"])
        with pytest.raises(ApiError) as refused:
            source.submit("meter-b", [b"3", b"4"])
        assert (refused.value.status, refused.value.code) == (503, "overloaded")
        assert int(refused.value.headers["Retry-After"]) > 0
        assert (len(delivered), source.pending) == (2, 2), "nothing of it was delivered"
        waiting = [*first, *source.submit("meter-b", [b"3"])]
        await source.publish_many([("meters/meter-a/receipts", b"{}")])
        assert first[0].done()
        assert source.pending == 2
        waiting += source.submit("meter-b", [b"4"])
        assert (len(delivered), source.pending) == (4, 3)
        await source.stop()
        assert source.pending == 0
        assert [f.exception() is not None for f in waiting] == [False, True, True, True]

    asyncio.run(scenario())
