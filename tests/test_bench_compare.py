"""`bench compare`: two checkouts' drains alternated on one machine, and their ratio."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from meterproof.bench import report
from meterproof.bench.compare import (
    CompareIncompleteError,
    command_of,
    live_summary,
    load_once,
    run_compare,
    same_accounting,
    server_cost,
)
from meterproof.cli.main import main as meterproof
from meterproof.errors import InputError, MeterproofError

ROOT = Path(__file__).resolve().parents[1]
MACHINE = {"date": "2026-12-04 00:00 UTC", "cpu": "x", "cores": "2", "memory": "1", "os": "y"}


def test_a_checkout_without_its_venv_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"\.venv/bin/meterproof is missing"):
        command_of(tmp_path)


@pytest.mark.slow
def test_the_same_code_on_both_sides_drains_runs_live_tiers_and_renders(tmp_path: Path) -> None:
    lines: list[str] = []
    figures = run_compare(
        ROOT, ROOT, label="same code", rounds=1, readings=1_000, workers=1,
        progress=lines.append, live=[200], live_seconds=2, live_meters=20,
    )  # fmt: skip
    assert [len(figures["runs"][side]) for side in ("baseline", "current")] == [1, 1]
    for side in ("baseline", "current"):
        assert figures["runs"][side][0]["readings"] == 1_000
        assert figures["means"][side]["cpu_us_per_reading"] > 0
        server = figures["runs"][side][0]["server_us_per_reading"]
        assert set(server) == {"broker", "postgres", "redis", "workers"}
        # a 1,000-reading drain is too short for the broker's and Redis's clock ticks
        assert server["postgres"] > 0, server
        run = figures["runs"][side][0]
        assert server["workers"] == pytest.approx(run["cpu_us_per_reading"], abs=0.1)
    assert figures["ratio"]["drain_per_s"] == pytest.approx(
        figures["means"]["current"]["drain_per_s"] / figures["means"]["baseline"]["drain_per_s"]
    )
    for side in ("baseline", "current"):
        (tier,) = figures["runs"][side][0]["live"]
        assert tier["offered_per_s"] == 200
        assert tier["server_us_per_reading"] > 0
    assert figures["live"]["per_rate"][0]["ratio"] > 0
    assert len(lines) == 4  # each side's drain, then its live tier

    results = tmp_path / "results"
    results.mkdir()
    machine = {"date": "2026-12-04 00:00 UTC", "cpu": "x", "cores": "2", "memory": "1", "os": "y"}
    (results / "compare-20261204T000000Z.json").write_text(
        json.dumps({"suite": "compare", "quick": False, "machine": machine, "figures": figures})
    )
    text = report.render(results, tmp_path / "docs" / "benchmarks.md").read_text()
    assert "## Before and after (same machine, alternating runs)" in text
    assert "same code: backlog drains of 1,000 readings with 1 worker" in text


@pytest.mark.slow
def test_a_side_that_overruns_is_stopped_by_sigterm_and_stops_its_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not subprocess.run's SIGKILL on timeout, which left the side's servers running."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the side's run makes its folder
    with pytest.raises(MeterproofError, match=r"bench load did not end in 12 s"):
        load_once(command_of(ROOT), rates=[50], seconds=600, meters=4, workers=1, timeout_s=12)
    assert list(tmp_path.iterdir()) == []  # removed by the side's own way out
    mine = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if any(str(tmp_path) in arg for arg in p.info["cmdline"] or ())
    ]
    assert mine == []


def _tier(offered: int, accepted: float, **cores: float) -> dict[str, object]:
    return {
        "offered_per_s": offered,
        "accepted_per_s": accepted,
        "sustained": True,
        "latency_ms": {"p99": 20.0},
        "cpu": {"cores": cores},
    }


def test_the_server_cost_of_a_tier_leaves_the_generator_out() -> None:
    cost = server_cost(
        _tier(1_000, 1_000.0, workers=0.4, postgres=0.2, broker=0.1, redis=0.02, generator=0.25)
    )
    assert cost["us_per_reading"] == pytest.approx(
        {"workers": 400, "postgres": 200, "broker": 100, "redis": 20}
    )
    assert cost["server_us_per_reading"] == pytest.approx(720)
    assert cost["generator_us_per_reading"] == pytest.approx(250)


def test_live_rounds_compare_per_rate_by_the_ratio_of_the_means() -> None:
    def run(workers: float) -> dict[str, object]:
        return {"live": [server_cost(_tier(1_000, 1_000.0, workers=workers, postgres=0.1))]}

    runs = {"baseline": [run(0.5), run(0.3)], "current": [run(0.2), run(0.2)]}
    live = live_summary(runs, [1_000], seconds=15, meters=2_000)
    (rate,) = live["per_rate"]
    assert rate["means"]["baseline"]["server_us_per_reading"] == pytest.approx(500)
    assert rate["means"]["current"]["server_us_per_reading"] == pytest.approx(300)
    assert rate["ratio"] == pytest.approx(0.6)
    assert rate["median_round_ratio"] == pytest.approx((300 / 600 + 300 / 400) / 2)


def test_live_tiers_render_beside_the_drain(tmp_path: Path) -> None:
    def run(workers: float) -> dict[str, object]:
        return {
            "drain_per_s": 100.0, "cpu_us_per_reading": 90.0, "load_1m_before": 1.0,
            "live": [server_cost(_tier(1_000, 1_000.0, workers=workers, postgres=0.1))],
        }  # fmt: skip

    runs = {"baseline": [run(0.5)], "current": [run(0.3)]}
    mean = {"drain_per_s": 100.0, "cpu_us_per_reading": 90.0}
    figures = {
        "label": "live", "baseline": "a", "current": "b", "readings": 1_000, "workers": 2,
        "runs": runs, "means": {"baseline": mean, "current": mean},
        "ratio": {"drain_per_s": 1.0, "cpu_us_per_reading": 1.0},
        "live": live_summary(runs, [1_000], seconds=15, meters=2_000),
    }  # fmt: skip
    results = tmp_path / "results"
    results.mkdir()
    machine = {"date": "2026-12-04 00:00 UTC", "cpu": "x", "cores": "2", "memory": "1", "os": "y"}
    (results / "compare-20261204T000000Z.json").write_text(
        json.dumps({"suite": "compare", "quick": False, "machine": machine, "figures": figures})
    )
    text = report.render(results, tmp_path / "docs" / "benchmarks.md").read_text()
    assert "| 1,000 | 600 (workers 500, postgres 100, broker 0, redis 0) " in text
    assert (
        "| 400 (workers 300, postgres 100, broker 0, redis 0) | 0.667 | 0.667 (0.667-0.667) "
        "| 1 / 1 of 1 | 0 |" in text
    )


def _live_runs(
    baseline: list[tuple[float, bool]], current: list[tuple[float, bool]]
) -> dict[str, list[dict[str, object]]]:
    """Rounds of one 1,000/s tier: (worker cores, sustained) per side and round."""

    def run(workers: float, sustained: bool) -> dict[str, object]:
        tier = {**_tier(1_000, 1_000.0, workers=workers, postgres=0.1), "sustained": sustained}
        return {
            "drain_per_s": 100.0, "cpu_us_per_reading": 90.0, "load_1m_before": 1.0,
            "live": [server_cost(tier)],
        }  # fmt: skip

    return {"baseline": [run(*r) for r in baseline], "current": [run(*r) for r in current]}


def test_live_rounds_either_side_did_not_sustain_are_left_out_and_counted() -> None:
    """An overloaded tier's µs per accepted reading is the backlog's cost, not the rate's:
    averaged in, round 2's 2,000 µs would have made the current side look 1.6x worse."""
    runs = _live_runs([(0.5, True), (0.5, True)], [(0.4, True), (1.9, False)])
    (rate,) = live_summary(runs, [1_000], seconds=15, meters=2_000)["per_rate"]
    assert rate["ratio"] == pytest.approx(500 / 600)
    assert rate["means"]["current"]["server_us_per_reading"] == pytest.approx(500)
    assert rate["round_ratio_range"] == pytest.approx([500 / 600, 500 / 600])
    assert (rate["rounds_compared"], rate["rounds_left_out"]) == (1, 1)
    assert rate["sustained"] == {"baseline": 2, "current": 1}


def test_with_no_round_sustained_on_both_sides_no_ratio_is_given(tmp_path: Path) -> None:
    runs = _live_runs([(0.5, True), (0.5, False)], [(0.4, False), (0.4, True)])
    live = live_summary(runs, [1_000], seconds=15, meters=2_000)
    (rate,) = live["per_rate"]
    assert "ratio" not in rate
    assert (rate["rounds_compared"], rate["rounds_left_out"]) == (0, 2)
    mean = {"drain_per_s": 100.0, "cpu_us_per_reading": 90.0}
    figures = {
        "label": "live", "baseline": "a", "current": "b", "readings": 1_000, "workers": 2,
        "runs": runs, "means": {"baseline": mean, "current": mean},
        "ratio": {"drain_per_s": 1.0, "cpu_us_per_reading": 1.0}, "live": live,
    }  # fmt: skip
    results = tmp_path / "results"
    results.mkdir()
    (results / "compare-20261204T000000Z.json").write_text(
        json.dumps({"suite": "compare", "quick": False, "machine": MACHINE, "figures": figures})
    )
    text = report.render(results, tmp_path / "docs" / "benchmarks.md").read_text()
    assert "| 1,000 | - | - | none: no round sustained on both sides | - | 1 / 1 of 2 | 2 |" in text


def _checkout(root: Path, side: str, order: Path, drain_per_s: float, *, fails_on: int = 0) -> Path:
    """A checkout whose `meterproof bench ingest` notes that it ran and saves one drain;
    its `fails_on`-th run fails instead."""
    command = root / side / ".venv" / "bin" / "meterproof"
    command.parent.mkdir(parents=True)
    figures = {"figures": {"runs": [{"drain_per_s": drain_per_s, "cpu_us_per_reading": 50.0}]}}
    command.write_text(
        f"#!/bin/sh\necho {side} >> {order}\n"
        f"if [ $(grep -c {side} {order}) -eq {fails_on} ]; then\n"
        "  echo 'the broker did not start' >&2; exit 1\nfi\n"
        f"echo '{json.dumps(figures)}' > r.json\necho 'raw results: r.json' >&2\n"
    )
    command.chmod(0o755)
    return command.parents[2]


def test_rounds_alternate_which_side_drains_first_and_report_the_ratios_spread(
    tmp_path: Path,
) -> None:
    """Baseline-then-current in every round put whatever favours a round's first (or
    second) run on one side only; the median of the rounds' ratios is no spread."""
    order = tmp_path / "order"
    baseline = _checkout(tmp_path, "baseline", order, 100.0)
    current = _checkout(tmp_path, "current", order, 110.0)
    figures = run_compare(
        baseline, current, label="", rounds=4, readings=1_000, workers=1,
        progress=lambda _: None,
    )  # fmt: skip
    assert order.read_text().split() == ["baseline", "current", "current", "baseline"] * 2
    assert figures["ratio"]["drain_per_s"] == pytest.approx(1.1)
    assert figures["round_ratio_range"]["drain_per_s"] == pytest.approx([1.1, 1.1])


def test_the_report_shows_the_range_of_the_rounds_ratios(tmp_path: Path) -> None:
    def run(drain_per_s: float) -> dict[str, object]:
        return {"drain_per_s": drain_per_s, "cpu_us_per_reading": 90.0, "load_1m_before": 1.0}

    runs = {"baseline": [run(100.0), run(100.0)], "current": [run(90.0), run(120.0)]}
    figures = {
        "label": "", "baseline": "a", "current": "b", "readings": 1_000, "workers": 2,
        "runs": runs, "means": {"baseline": runs["baseline"][0], "current": run(105.0)},
        "ratio": {"drain_per_s": 1.05, "cpu_us_per_reading": 1.0},
        "median_round_ratio": {"drain_per_s": 1.05, "cpu_us_per_reading": 1.0},
        "round_ratio_range": {"drain_per_s": [0.9, 1.2], "cpu_us_per_reading": [1.0, 1.0]},
    }  # fmt: skip
    results = tmp_path / "results"
    results.mkdir()
    machine = {"date": "2026-12-04 00:00 UTC", "cpu": "x", "cores": "2", "memory": "1", "os": "y"}
    (results / "compare-20261204T000000Z.json").write_text(
        json.dumps({"suite": "compare", "quick": False, "machine": machine, "figures": figures})
    )
    text = report.render(results, tmp_path / "docs" / "benchmarks.md").read_text()
    assert "The rounds' ratios ranged over 0.900-1.200 and 1.000-1.000." in text


def test_a_failed_round_keeps_the_finished_ones_saved_and_marked_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 2's first run (the current side's second) fails: round 1 is saved, marked
    incomplete with the error, and the command still exits non-zero."""
    order = tmp_path / "order"
    baseline = _checkout(tmp_path, "baseline", order, 100.0)
    current = _checkout(tmp_path, "current", order, 110.0, fails_on=2)
    monkeypatch.chdir(current)
    result = CliRunner().invoke(
        meterproof, ["bench", "compare", "--baseline", str(baseline), "--rounds", "3",
                     "--readings", "1000", "--workers", "1"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "round 2 of 3 failed (1 finished)" in result.output
    assert "the broker did not start" in result.output
    (saved,) = (current / "bench" / "results").glob("compare-*.json")
    figures = json.loads(saved.read_text())["figures"]
    assert figures["incomplete"]["rounds"] == 1
    assert "the broker did not start" in figures["incomplete"]["error"]
    assert [len(figures["runs"][side]) for side in ("baseline", "current")] == [1, 1]
    assert figures["ratio"]["drain_per_s"] == pytest.approx(1.1)
    text = (current / "docs" / "benchmarks.md").read_text()
    assert "**Incomplete**: 1 of 3 rounds finished; the next failed:" in text


def test_a_compare_whose_first_round_failed_is_saved_and_rendered(tmp_path: Path) -> None:
    order = tmp_path / "order"
    baseline = _checkout(tmp_path, "baseline", order, 100.0, fails_on=1)
    current = _checkout(tmp_path, "current", order, 110.0)
    with pytest.raises(CompareIncompleteError, match="round 1 of 2 failed") as failed:
        run_compare(
            baseline, current, label="", rounds=2, readings=1_000, workers=1,
            progress=lambda _: None,
        )  # fmt: skip
    figures = failed.value.figures
    assert "means" not in figures
    results = tmp_path / "results"
    results.mkdir()
    (results / "compare-20261204T000000Z.json").write_text(
        json.dumps({"suite": "compare", "quick": False, "machine": MACHINE, "figures": figures})
    )
    text = report.render(results, tmp_path / "docs" / "benchmarks.md").read_text()
    assert "**Incomplete**: 0 of 2 rounds finished" in text


def test_a_baseline_from_before_readiness_is_compared_on_its_own_accounting() -> None:
    """A baseline drain counted from the workers' start (no `ready_s`) against one counted
    from readiness: both on the older accounting, or the current side would look cheaper
    by the workers' start-up alone; two runs that both tell readiness stay as they are."""
    old = {"readings": 10_000, "drain_per_s": 2_000.0, "cpu_us_per_reading": 200.0}
    new = {
        "readings": 10_000, "ready_s": 1.0, "drain_s": 4.0, "drain_per_s": 2_500.0,
        "worker_cpu_s": 1.5, "cpu_us_per_reading": 150.0, "startup_cpu_s": {"workers": 0.5},
    }  # fmt: skip
    runs, counted = same_accounting({"baseline": [old], "current": [new]})
    assert counted == "from the workers' start"
    assert runs["baseline"] == [old]
    (current,) = runs["current"]
    assert current["drain_per_s"] == pytest.approx(10_000 / 5.0)
    assert current["cpu_us_per_reading"] == pytest.approx(2.0 * 1e6 / 10_000)
    alike, counted = same_accounting({"baseline": [new], "current": [new]})
    assert (alike, counted) == ({"baseline": [new], "current": [new]}, "from readiness")
