"""`bench compare`: two checkouts' drains alternated on one machine, and their ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meterproof.bench import report
from meterproof.bench.compare import command_of, run_compare
from meterproof.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_a_checkout_without_its_venv_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"\.venv/bin/meterproof is missing"):
        command_of(tmp_path)


@pytest.mark.slow
def test_the_same_code_on_both_sides_drains_every_reading_and_renders(tmp_path: Path) -> None:
    lines: list[str] = []
    figures = run_compare(
        ROOT, ROOT, label="same code", rounds=1, readings=1_000, workers=1, progress=lines.append
    )
    assert [len(figures["runs"][side]) for side in ("baseline", "current")] == [1, 1]
    for side in ("baseline", "current"):
        assert figures["runs"][side][0]["readings"] == 1_000
        assert figures["means"][side]["cpu_us_per_reading"] > 0
    assert figures["ratio"]["drain_per_s"] == pytest.approx(
        figures["means"]["current"]["drain_per_s"] / figures["means"]["baseline"]["drain_per_s"]
    )
    assert len(lines) == 2

    results = tmp_path / "results"
    results.mkdir()
    machine = {"date": "2026-12-04 00:00 UTC", "cpu": "x", "cores": "2", "memory": "1", "os": "y"}
    (results / "compare-20261204T000000Z.json").write_text(
        json.dumps({"suite": "compare", "quick": False, "machine": machine, "figures": figures})
    )
    text = report.render(results, tmp_path / "docs" / "benchmarks.md").read_text()
    assert "## Before and after (same machine, alternating runs)" in text
    assert "same code: backlog drains of 1,000 readings with 1 worker" in text
