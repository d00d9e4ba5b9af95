"""Rate limits per class and caller, on a server started with small ones."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fixtures.api import ApiServer, signed
from ingest_harness import provision

from meterproof.schemas.timestamps import wall_ms


@pytest.fixture(scope="module")
def api_env() -> dict[str, str]:
    return {"METERPROOF_API_RATE_SUBMISSION_PER_MIN": "2"}


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
