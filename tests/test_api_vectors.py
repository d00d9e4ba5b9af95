"""One judge for both doors: every shared rejection vector (schemas/vectors) submitted
over HTTPS to `meterproof api` and published over MQTT to an ingest worker, on the same
database, gets the same reason code, and the clock-independent ones get the vector's."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fixtures.api import ApiServer
from ingest_harness import ProbeMeter, provision, running_worker, worker_settings

from meterproof.certs.layout import PkiLayout
from meterproof.stack.broker import BrokerServer
from meterproof.stack.redis import RedisServer

REJECTIONS: dict[str, Any] = json.loads(
    (Path(__file__).parent.parent / "schemas" / "vectors" / "rejections.json").read_text()
)
#: Judged against the wall clock here (a year after the vectors' server time): stale.
CLOCK_DEPENDENT = {"future timestamp", "eight days old"}
#: The vectors whose topic no path can name, and the refusal each gets over HTTPS.
UNROUTABLE = {
    "meter_id with slash": (404, "not_found"),  # two path segments: no such route
    "meter_id too long": (422, "invalid_request"),  # the path parameter's pattern
}


@pytest.mark.slow
def test_rejection_vectors_get_the_same_codes_over_https_and_mqtt(
    api_server: ApiServer, pki: PkiLayout, broker: BrokerServer, redis_server: RedisServer
) -> None:
    meter_id, other = REJECTIONS["meter_id"], "SM2025-ENG-001-ABC123"
    provision(pki, api_server.database_url, meter_id, public_key_pem=REJECTIONS["public_key_pem"])
    provision(pki, api_server.database_url, other)
    with psycopg.connect(api_server.database_url, autocommit=True) as conn:
        conn.execute("UPDATE meter_keys SET valid_from = '2025-01-01'")
    senders = {f"meters/{meter_id}/readings": meter_id, f"meters/{other}/readings": other}
    routable = [c for c in REJECTIONS["cases"] if c["topic"] in senders]
    unroutable = [c for c in REJECTIONS["cases"] if c["topic"] not in senders]
    assert {c["name"] for c in unroutable} == set(UNROUTABLE)

    over_https: list[str] = []
    for case in routable:
        sender = senders[case["topic"]]
        with api_server.meter_client(sender) as http:
            answer = http.post(f"/api/meters/{sender}/energy", content=case["payload"].encode())
        assert answer.status_code == 422, answer.text
        assert answer.json()["receipt"]["reason"] == answer.json()["code"]
        over_https.append(answer.json()["code"])
    with api_server.meter_client(meter_id) as http:
        for case in unroutable:  # no certificate owns these topics; no path names them
            path = case["topic"].removeprefix("meters/").removesuffix("/readings")
            answer = http.post(f"/api/meters/{path}/energy", content=case["payload"].encode())
            assert (answer.status_code, answer.json()["code"]) == UNROUTABLE[case["name"]]

    settings = worker_settings(
        pki=pki, port=broker.port, database_url=api_server.database_url,
        redis_url=redis_server.url, quarantine_failures=1000, rate_max_readings=1000,
    )  # fmt: skip

    async def over_mqtt() -> list[str]:
        async with running_worker(settings):
            meters = {m: ProbeMeter(m, None, pki, broker.port) for m in (meter_id, other)}
            for meter in meters.values():
                await meter.connect()
            for case in routable:
                meters[senders[case["topic"]]].publish(
                    case["payload"].encode(), topic=case["topic"]
                )
            own = await meters[meter_id].wait_receipts(len(routable) - 1)
            theirs = await meters[other].wait_receipts(1)
            for meter in meters.values():
                await meter.close()
        by_sender = {meter_id: iter(own), other: iter(theirs)}
        return [str(next(by_sender[senders[c["topic"]]])["reason"]) for c in routable]

    assert over_https == asyncio.run(over_mqtt())
    expected = ["stale_reading" if c["name"] in CLOCK_DEPENDENT else c["reason"] for c in routable]
    assert over_https == expected
