"""`meterproof bench shards` in a small form: meters sharded over three real brokers by a
hash of their ids, every worker subscribed on each, and the report section it renders."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from meterproof.bench import report
from meterproof.bench.connections import run_connections
from meterproof.bench.loadgen import plan


def test_a_meters_broker_is_a_stable_hash_of_its_id_spread_over_all_brokers() -> None:
    ids = [f"meter-{i:05d}" for i in range(3_000)]
    first = [plan.broker_index(m, 3) for m in ids]
    assert first == [plan.broker_index(m, 3) for m in ids]  # the same broker every time
    counts = [first.count(b) for b in range(3)]
    assert all(900 <= n <= 1_100 for n in counts), counts
    assert plan.broker_index("meter-00000", 1) == 0


@pytest.mark.slow
def test_meters_sharded_over_three_brokers_are_all_ingested(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="meterproof-bench-") as run_dir:
        Path(run_dir).chmod(0o755)  # PostgreSQL runs as its own user
        figures = run_connections(
            Path(run_dir), meters=30, interval_s=1.0, seconds=2.0, workers=1,
            progress=lambda _line: None, brokers=3,
        )  # fmt: skip
    assert figures["brokers"] == 3
    connect = figures["connect"]
    assert connect["connected"] == figures["held"] == 30
    assert len(connect["per_broker"]) == 3
    assert all(n > 0 for n in connect["per_broker"]), connect["per_broker"]
    reporting = figures["reporting"]
    assert reporting["expected"] == 60
    # Receipts come back from every broker: the worker is subscribed on each.
    assert reporting["statuses"] == {"accepted": 60}
    assert reporting["unreceipted"] == 0
    assert reporting["cpu"]["rss_mib"]["broker"] > 0
    assert figures["broker_memory"]["rss_after_mib"] > figures["broker_memory"]["rss_before_mib"]
    assert figures["generator_memory"]["per_meter_kib"] > 0

    results, out = tmp_path / "results", tmp_path / "docs" / "benchmarks.md"
    results.mkdir()
    machine = {"date": "2026-12-05 12:00 UTC", "cpu": "test", "cores": "2", "memory": "1",
               "os": "test"}  # fmt: skip
    (results / "shards-20261205T120000Z.json").write_text(
        json.dumps({"suite": "shards", "quick": True, "machine": machine, "figures": figures})
    )
    text = report.render(results, out).read_text()
    assert "## Meters sharded over 3 brokers" in text
    assert "`meterproof bench shards`: 30 meters" in text
    per_broker = " / ".join(f"{n:,}" for n in connect["per_broker"])
    assert f"| meters per broker | {per_broker} |" in text
    assert "| reporting: cores used (broker / PostgreSQL / Redis / workers / generators) | " in text
