"""`meterproof bench chain` in a small form: real gas and latency measurements on a dev
node of its own, and the report section they render."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from meterproof.bench import report
from meterproof.bench.chain import run_chain


@pytest.mark.slow
def test_a_small_chain_bench_measures_gas_and_latency_and_renders_them(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="meterproof-bench-") as run_dir:
        Path(run_dir).chmod(0o755)  # PostgreSQL runs as its own user
        figures = run_chain(
            Path(run_dir), sizes=(16, 300), claims=3, direct_sizes=(1, 4, 8),
            latency_meters=20, confirmations=2, progress=lambda _line: None,
        )  # fmt: skip
    small, large = figures["trees"]
    assert small["proof_hashes"] == 4  # ceil(log2(16))
    assert large["proof_hashes"] == 9  # ceil(log2(300))
    assert abs(small["anchor_gas"] - large["anchor_gas"]) < 1_000  # one root, whatever n
    assert large["claim_gas_mean"] > small["claim_gas_mean"]  # five more hashes
    direct = figures["direct"]
    assert direct["measured"][2]["gas"] > direct["measured"][1]["gas"] + 4 * 20_000
    assert direct["per_wallet_gas"] > 20_000  # a new balance is a fresh storage slot
    latency = figures["latency"]
    assert latency["confirmations"] == 2
    assert 1.0 <= latency["close_to_confirmed_s"] < 30  # at least one more 1-second block

    results, out = tmp_path / "results", tmp_path / "docs" / "benchmarks.md"
    results.mkdir()
    machine = {"date": "2026-12-04 06:00 UTC", "cpu": "test", "cores": "2", "memory": "1",
               "os": "test"}  # fmt: skip
    (results / "chain-20261204T060000Z.json").write_text(
        json.dumps({"suite": "chain", "machine": machine, "figures": figures})
    )
    report.render(results, out)
    text = out.read_text()
    assert "## GRID on an EVM chain (ganache)" in text
    assert f"| 300 | {large['anchor_gas']:,} |" in text
    assert "epoch close to 2 confirmations" in text
