"""What the API's reads serve, against the real server process: readings rendered by
PostgreSQL (api/reads.py) are exactly the verified readings submitted, in JSON and CSV,
whole or page by page, read through history pages (api/pages.py) or row by row, and a
hostile `kid` stored by other means still makes valid JSON and CSV. How fast they are is
`meterproof bench api`'s business (docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from fixtures.api import ApiServer
from ingest_harness import SilentProxy, provision
from waiting import wait_until

from meterproof.api import reads
from meterproof.api.pages import QUARTER_MS
from meterproof.api.reads import FIELDS
from meterproof.consent import repository as consent
from meterproof.consent.model import Scope
from meterproof.db.silence import SILENT
from meterproof.schemas.codec import encode_reading, sign_reading
from meterproof.schemas.reading import VerifiedReading, b64url
from meterproof.schemas.timestamps import ms_to_dt, wall_ms
from meterproof.stack.postgres import PostgresServer

COUNT = 2_500


@pytest.fixture(scope="module")
def api_env() -> dict[str, str]:
    return {"METERPROOF_RATE_MAX_READINGS": "1000000", "METERPROOF_API_PAGES_INTERVAL_S": "0.5"}


def _fields(meter_id: str, seq: int, ts: int) -> dict[str, Any]:
    """Optional fields present on some readings only, negative values among them."""
    fields: dict[str, Any] = {"meter_id": meter_id, "seq": seq, "ts": ts,
                              "import_wh": 10_000 + seq * 7, "export_wh": seq}  # fmt: skip
    if seq % 3:
        fields |= {"power_w": -1_500 + seq, "voltage_mv": 230_100, "frequency_mhz": 49_990}
    if seq % 5 == 0:
        fields |= {"current_ma": 6_500, "power_factor_milli": -950}
    return fields


def _as_csv(readings: list[dict[str, Any]]) -> str:
    """The CSV the route promises: FIELDS as columns, csv's minimal quoting, absent = empty."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(readings)
    return out.getvalue()


def _whole(http: httpx.Client, meter_id: str, limit: int, **params: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        answer = http.get(f"/api/meters/{meter_id}/history", params=query)
        assert answer.status_code == 200, answer.text
        page = answer.json()
        found += page["readings"]
        cursor = page["next_cursor"]
        if cursor is None:
            return found


@pytest.mark.slow
def test_reads_serve_exactly_the_verified_readings_submitted(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id = make_meter_id()
    key = provision(api_server.pki, api_server.database_url, meter_id)
    start = wall_ms() - COUNT * 5_000
    signed = [sign_reading(_fields(meter_id, i + 1, start + i * 5_000), key) for i in range(COUNT)]
    hashes: list[str] = []
    with api_server.meter_client(meter_id) as meter:
        for i in range(0, COUNT, 1_000):
            body = {"readings": [encode_reading(r).decode() for r in signed[i : i + 1_000]]}
            answer = meter.post("/api/meters/energy/batch", json=body)
            assert answer.status_code == 200, answer.text
            receipts = answer.json()["receipts"]
            assert [r["status"] for r in receipts] == ["accepted"] * len(receipts)
            hashes += [r["reading_hash"] for r in receipts]

    token = api_server.operator_token()
    with api_server.client(headers={"Authorization": f"Bearer {token}"}) as http:
        day = {"from": start, "to": start + COUNT * 5_000}
        whole = _whole(http, meter_id, 20_000, **day)
        assert _whole(http, meter_id, 1_000, **day) == whole  # three pages, by the cursor
        assert len(whole) == COUNT
        for served, sent, digest in zip(whole, signed, hashes, strict=True):
            verified = VerifiedReading.model_validate(served)
            assert verified.wire_dict() == {**sent.wire_dict(), "reading_hash": digest,
                                            "verified_at": verified.verified_at}  # fmt: skip
            assert served.keys() == verified.wire_dict().keys()  # absent stays absent
            assert served["reading_hash"] == digest

        as_csv = http.get(f"/api/meters/{meter_id}/history", params={**day, "format": "csv",
                                                                      "limit": 20_000})  # fmt: skip
        assert as_csv.headers["content-type"].startswith("text/csv")
        assert as_csv.text == _as_csv(whole)

        latest = http.get(f"/api/meters/{meter_id}/latest")
        assert latest.status_code == 200
        assert latest.json() == whole[-1]

        aligned = {**day, "from": start // 900_000 * 900_000, "width": "15m"}
        quarters = http.get(f"/api/meters/{meter_id}/rollups", params=aligned)
        rows = quarters.json()["rollups"]
        assert sum(r["readings"] for r in rows) == COUNT
        assert sum(r["import_wh"] for r in rows) == (COUNT - 1) * 7  # first one has no predecessor


@pytest.mark.slow
def test_a_hostile_kid_still_renders_valid_json_and_csv(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    """Registered kids are [A-Za-z0-9._:-], but `readings.kid` holds any text: JSON's
    escapes keep '+', '/' and '=' away from the page-wide base64url step, CSV quotes."""
    meter_id = make_meter_id()
    provision(api_server.pki, api_server.database_url, meter_id)
    kid, sig, ts = 'k+/="\n,é', bytes(range(64)), wall_ms() - 60_000
    with psycopg.connect(api_server.database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO readings (meter_id, seq, ts, import_wh, export_wh, alg, kid, sig,"
            " reading_hash, received_at, verified_at) VALUES (%s, 1, %s, 5, 0, 'EdDSA', %s, %s,"
            " %s, now(), %s)",
            (meter_id, ms_to_dt(ts), kid, sig, bytes(32), ms_to_dt(ts + 3)),
        )
    token = api_server.operator_token()
    with api_server.client(headers={"Authorization": f"Bearer {token}"}) as http:
        params = {"from": ts, "to": ts + 1}
        page = orjson.loads(http.get(f"/api/meters/{meter_id}/history", params=params).content)
        (reading,) = page["readings"]
        assert (reading["kid"], reading["sig"], reading["ts"]) == (kid, b64url(sig), ts)
        assert reading["verified_at"] == ts + 3
        assert "power_w" not in reading
        text = http.get(f"/api/meters/{meter_id}/history", params={**params, "format": "csv"}).text
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [(r["kid"], r["sig"], r["power_w"]) for r in rows] == [(kid, b64url(sig), "")]


def _served_from_pages(api_server: ApiServer) -> float:
    return api_server.sample("meterproof_api_history_reads_total", way="pages")


def _consented(api_server: ApiServer, name: str, meter_id: str, data_from: int) -> str:
    """A new integrator's token, once its history consent for the meter from `data_from`
    on (open-ended) has reached the API's consent view."""
    with psycopg.connect(api_server.database_url, autocommit=True) as conn:
        secret = consent.add_integrator(conn, name, cert_serial="0a1b")
        consent.grant(
            conn,
            consent.GrantRequest(
                integrator=name, meter_id=meter_id, account=None,
                scopes=frozenset({Scope.HISTORY}), data_from=ms_to_dt(data_from),
                data_to=None, expires_at=None,
            ),
            operator_reason="test",
        )  # fmt: skip
    token = api_server.token(name, secret)
    with api_server.client(headers={"Authorization": f"Bearer {token}"}) as http:
        wait_until(
            lambda: http.get(f"/api/meters/{meter_id}/latest").status_code == 200,
            what=f"{name}'s consent reaches the API's consent view",
        )
    return token


def _wait_for_pages(database_url: str, meter_id: str, quarters: int) -> None:
    """Until the API's renderer has written `quarters` pages of the meter."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        for _ in range(120):
            row = conn.execute(
                "SELECT count(*) FROM history_pages WHERE meter_id = %s", (meter_id,)
            ).fetchone()
            if row and row[0] >= quarters:
                return
            time.sleep(0.25)
    pytest.fail(f"the renderer wrote {row[0] if row else 0} of {quarters} pages of {meter_id}")


@pytest.mark.slow
def test_history_pages_serve_what_rows_serve_and_never_hide_a_late_reading(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    """Three hours of readings ending an hour ago, every quarter closed: once rendered, a
    whole-range read goes through pages, with ragged edges and from a cursor, and equals
    the row-by-row read. A reading stored afterwards in a rendered quarter shows at once."""
    meter_id = make_meter_id()
    key = provision(api_server.pki, api_server.database_url, meter_id)
    start = (wall_ms() - 4 * 3_600_000) // QUARTER_MS * QUARTER_MS
    count = 3 * 720  # one every 5 s, skipping every 7th so a late one can come in later
    stamps = [start + i * 5_000 for i in range(count + count // 6) if i % 7 != 3][:count]
    signed = [sign_reading(_fields(meter_id, i + 1, ts), key) for i, ts in enumerate(stamps)]
    with api_server.meter_client(meter_id) as meter:
        for i in range(0, count, 1_000):
            body = {"readings": [encode_reading(r).decode() for r in signed[i : i + 1_000]]}
            answer = meter.post("/api/meters/energy/batch", json=body)
            assert answer.status_code == 200, answer.text
    _wait_for_pages(api_server.database_url, meter_id, (stamps[-1] - start) // QUARTER_MS + 1)

    token = api_server.operator_token()
    with api_server.client(headers={"Authorization": f"Bearer {token}"}) as http:
        ranges = [
            {"from": start, "to": start + 4 * 3_600_000},  # whole quarters
            {"from": start + 123_457, "to": stamps[-1] - 4 * 60_000 + 1},  # ragged edges
        ]
        wholes = []
        for span in ranges:
            before = _served_from_pages(api_server)
            wholes.append(_whole(http, meter_id, 20_000, **span))
            assert _served_from_pages(api_server) == before + 1
            assert wholes[-1] == _whole(http, meter_id, 500, **span)  # rows, by the cursor
            in_span = [t for t in stamps if span["from"] <= t < span["to"]]
            assert [r["ts"] for r in wholes[-1]] == in_span
            before = _served_from_pages(api_server)
            as_csv = http.get(f"/api/meters/{meter_id}/history",
                              params={**span, "limit": 20_000, "format": "csv"})  # fmt: skip
            assert _served_from_pages(api_server) == before + 1
            assert as_csv.status_code == 200, as_csv.text
            assert as_csv.text == _as_csv(wholes[-1])
            assert "x-next-cursor" not in as_csv.headers

        first = http.get(f"/api/meters/{meter_id}/history", params={**ranges[0], "limit": 700})
        before = _served_from_pages(api_server)
        rest = _whole(http, meter_id, 20_000, **ranges[0], cursor=first.json()["next_cursor"])
        assert _served_from_pages(api_server) == before + 1
        assert first.json()["readings"] + rest == wholes[0]

        # An integrator whose consent covers the range reads it through pages too, and so
        # does one whose consent starts inside it: the part it covers, and nothing else.
        for who, data_from in [("whole", start), ("half", start + 7_200_000 + 1_234)]:
            name = f"{who}-{meter_id[-12:]}"
            integrator = _consented(api_server, name, meter_id, data_from)
            before = _served_from_pages(api_server)
            with api_server.client(headers={"Authorization": f"Bearer {integrator}"}) as reader:
                seen = _whole(reader, meter_id, 20_000, **ranges[0])
                assert seen == _whole(reader, meter_id, 500, **ranges[0]), name  # rows
            assert _served_from_pages(api_server) == before + 1, name
            assert seen == [r for r in wholes[0] if r["ts"] >= data_from], name

        p = 902  # stamps[p] is seq p + 1; the slot after it was skipped, mid-range
        late_ts = stamps[p] + 5_000
        assert stamps[p + 1] == late_ts + 5_000
        assert (late_ts - start) // QUARTER_MS == 5  # a quarter whose page is rendered
        fields = {"meter_id": meter_id, "seq": count + 1, "ts": late_ts,
                  "import_wh": 10_000 + (p + 1) * 7 + 3, "export_wh": p + 1}  # fmt: skip
        late = sign_reading(fields, key)
        with api_server.meter_client(meter_id) as meter:
            answer = meter.post(f"/api/meters/{meter_id}/energy", content=encode_reading(late))
            assert answer.status_code == 200, answer.text
        before = _served_from_pages(api_server)
        whole = _whole(http, meter_id, 20_000, **ranges[0])
        assert _served_from_pages(api_server) == before + 1  # its quarter from rows
        assert [r["seq"] for r in whole] == [*range(1, p + 2), count + 1, *range(p + 2, count + 1)]
        assert whole[p + 1]["ts"] == late_ts
        assert len(whole) == count + 1


def test_a_read_on_a_server_gone_silent_is_cut_and_read_again(
    postgres: PostgresServer, database_url: str
) -> None:
    """Every connection of the pool stops being answered and stays open (a primary's
    machine paused; new connections reach a new primary): a read waited on its socket for
    good. It is cut after `answer_within_s` and read again on a new connection; the pool
    is drained, so no other read waits on one of the silent connections it held."""
    proxy = SilentProxy(postgres.port)
    cuts = SILENT.labels(wait="api_read")

    async def scenario() -> tuple[list[tuple[Any, ...]], float, float]:
        async with (
            proxy.serving(database_url) as via,
            reads.ReadPool(via, answer_within_s=2, min_size=4, max_size=4) as pool,
        ):
            await pool.wait()
            assert await reads.query(pool, "SELECT 1", ()) == [(1,)]
            proxy.silence()
            before, started = cuts._value.get(), time.monotonic()
            rows = await asyncio.wait_for(reads.query(pool, "SELECT 2", ()), 30)
            took_s = time.monotonic() - started
            again = await asyncio.wait_for(reads.query(pool, "SELECT 3", ()), 30)
            assert again == [(3,)]
            return rows, took_s, cuts._value.get() - before

    rows, took_s, cut = asyncio.run(scenario())
    assert (rows, cut) == ([(2,)], 1), f"read again after {took_s:.1f} s"
