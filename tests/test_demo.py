"""The demo's closing advice names the run dir it was given."""

from __future__ import annotations

from pathlib import Path

from meterproof.config import DEFAULT_RUN_DIR, StackEnv
from meterproof.demo.run import _next_steps


def _advice(run_dir: Path) -> str:
    lines: list[str] = []
    _next_steps(StackEnv(), run_dir, lines.append)
    return "\n".join(lines)


def test_the_advice_points_at_the_run_dir_given() -> None:
    advice = _advice(Path("/srv/demo-run"))
    assert "/srv/demo-run/logs/ingest.log" in advice
    assert "`meterproof stack down --run-dir /srv/demo-run`" in advice
    assert ".run/" not in advice


def test_the_default_run_dir_needs_no_option() -> None:
    advice = _advice(DEFAULT_RUN_DIR)
    assert f"{DEFAULT_RUN_DIR / 'logs' / 'bridge.log'}" in advice
    assert "`meterproof stack down`" in advice
