"""Raw results as JSON under bench/results/, and docs/benchmarks.md rendered from the
latest result of each suite, so the report never shows a figure nobody measured."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

RESULTS: Final = Path("bench/results")
REPORT: Final = Path("docs/benchmarks.md")


def save(suite: str, machine: dict[str, str], figures: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{suite}-{stamp}.json"
    path.write_text(json.dumps({"suite": suite, "machine": machine, "figures": figures}, indent=2))
    return path


def _latest(suite: str) -> dict[str, Any] | None:
    found = sorted(RESULTS.glob(f"{suite}-*.json"))
    if not found:
        return None
    data: dict[str, Any] = json.loads(found[-1].read_text())
    data["file"] = str(found[-1])
    return data


def _ingest(data: dict[str, Any]) -> list[str]:
    f = data["figures"]
    rows = [
        f"| {run['workers']} | {run['readings']:,} | {run['drain_per_s']:,.0f} "
        f"| {run['count_only_per_s']:,.0f} | {run['ratio_to_count_only']:.0%} "
        f"| {run['drain_s']:.1f} s |"
        for run in f["runs"]
    ]
    return [
        "## Backlog drain (issue 3)",
        "",
        "A backlog of pre-signed Ed25519 readings (50 meters, mutual TLS, QoS 1) is queued in",
        "Mosquitto for the workers' persistent sessions and, through a second share group, for",
        "a count-only gmqtt subscriber that acknowledges on arrival (the raw receive limit). The",
        "count-only subscriber drains its copy first; then the workers start. The drain time",
        "runs from starting the worker processes (imports and connects included) until every",
        "reading is committed in PostgreSQL (fsync on) and acknowledged.",
        "",
        "| workers | readings | stored + acked /s | count-only receive /s | ratio | drain time |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Target (issue 3): >= 5,000 readings/s with two workers.",
        "",
    ]


def _bridge(data: dict[str, Any]) -> list[str]:
    f = data["figures"]
    return [
        "## Sealing, anchoring and verifying an epoch (issue 4)",
        "",
        f"One epoch of {f['readings']:,} readings from {f['meters']:,} meters, claimed while the",
        "epoch was open (as the bridge does), then sealed: final claim, RFC 6962 root, mints,",
        "signed entry; then appended to the local ledger; then `ledger verify` re-hashes every",
        "reading from its stored fields and re-checks root, chain, signature and mints.",
        "",
        "| step | seconds | target |",
        "|---|---|---|",
        f"| claims while the epoch was open ({f['claim_steps']} steps) | {f['claim_s']:.1f} | - |",
        f"| seal at the epoch's close | {f['seal_s']:.1f} | - |",
        f"| anchor (local sink) | {f['anchor_s']:.2f} | - |",
        f"| **seal + anchor** | **{f['seal_and_anchor_s']:.1f}** | < 10 |",
        f"| **ledger verify** | **{f['verify_s']:.1f}** | < 30 |",
        "",
    ]


SECTIONS: Final[dict[str, Callable[[dict[str, Any]], list[str]]]] = {
    "ingest": _ingest,
    "bridge": _bridge,
}


def render() -> Path:
    lines = [
        "# Benchmarks",
        "",
        "Produced by `make bench` (`meterproof bench`); raw JSON in `bench/results/`.",
        "Every figure below was measured on the machine listed with it.",
        "",
    ]
    for suite, section in SECTIONS.items():
        data = _latest(suite)
        if data is None:
            continue
        m = data["machine"]
        lines += section(data)
        lines += [
            f"Measured {m['date']} on {m['cores']} cores ({m['cpu']}), {m['memory']}, {m['os']};",
            f"Python {m['python']}, {m['mosquitto']}, {m['postgresql']}, {m['redis']}.",
            f"Raw: `{data['file']}`.",
            "",
        ]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(lines))
    return REPORT
