"""What the API costs, measured against the real server process on the session's servers
(2 shared cores here): batch submission rate through the in-process pipeline, and the
latency of latest, a whole meter-day of history and a day of 15-minute rollups with
one meter-day (17,280 readings, one every 5 s) stored. Figures are printed (`-s`);
the assertions check that everything submitted was stored and served."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
from fixtures.api import ApiServer, signed
from ingest_harness import provision

from meterproof.schemas.timestamps import wall_ms

DAY = 17_280
BATCH = 1000


@pytest.fixture(scope="module")
def api_env() -> dict[str, str]:
    return {"METERPROOF_RATE_MAX_READINGS": "1000000", "METERPROOF_BATCH_LINGER_MS": "25"}


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


@pytest.mark.slow
def test_batch_rate_and_read_latency_of_one_meter_day(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id = make_meter_id()
    key = provision(api_server.pki, api_server.database_url, meter_id)
    start = wall_ms() - DAY * 5000
    payloads = [
        signed(meter_id, key, i + 1, start + i * 5000, imp=i * 3).decode() for i in range(DAY)
    ]
    with api_server.meter_client(meter_id) as meter:
        began = time.perf_counter()
        statuses: list[str] = []
        for i in range(0, DAY, BATCH):
            answer = meter.post(
                "/api/meters/energy/batch", json={"readings": payloads[i : i + BATCH]}
            )
            assert answer.status_code == 200, answer.text
            statuses += [r["status"] for r in answer.json()["receipts"]]
        elapsed = time.perf_counter() - began
    assert statuses == ["accepted"] * DAY
    print(f"\nbatch submission: {DAY} readings in {elapsed:.2f} s = {DAY / elapsed:.0f}/s "
          f"(batches of {BATCH}, one client, answered after commit)")  # fmt: skip

    with api_server.client(
        headers={"Authorization": f"Bearer {api_server.operator_token()}"}
    ) as http:
        latest: list[float] = []
        for _ in range(300):
            began = time.perf_counter()
            assert http.get(f"/api/meters/{meter_id}/latest").json()["seq"] == DAY
            latest.append(time.perf_counter() - began)
        day: list[float] = []
        for _ in range(10):
            began = time.perf_counter()
            seen, cursor = 0, None
            while True:
                params = {"from": start, "limit": 5000, **({"cursor": cursor} if cursor else {})}
                page = http.get(f"/api/meters/{meter_id}/history", params=params).json()
                seen += len(page["readings"])
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            day.append(time.perf_counter() - began)
            assert seen == DAY
        rollup: list[float] = []
        aligned = start // 900_000 * 900_000
        window = {"from": aligned, "to": aligned + (DAY * 5000 // 900_000 + 1) * 900_000,
                  "width": "15m"}  # fmt: skip
        for _ in range(100):
            began = time.perf_counter()
            rows = http.get(f"/api/meters/{meter_id}/rollups", params=window).json()["rollups"]
            rollup.append(time.perf_counter() - began)
        assert sum(r["readings"] for r in rows) == DAY
    runs = {"latest": latest, "history, whole day (4 pages)": day, "rollups 15m, a day": rollup}
    for name, samples in runs.items():
        mean = statistics.mean(samples) * 1000
        print(f"{name}: n={len(samples)} p50={_p(samples, 0.5):.1f} ms "
              f"p99={_p(samples, 0.99):.1f} ms mean={mean:.1f} ms")  # fmt: skip
