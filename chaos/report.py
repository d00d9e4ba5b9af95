"""docs/reliability.md, rendered from one campaign's result: only figures that run saw (and
the hand-written part after `KEPT_MARKER`, kept as it is)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from meterproof.chaos.campaign import CampaignResult
from meterproof.chaos.faults import KILLING_KINDS, FaultRecord
from meterproof.chaos.plan import DESCRIPTION, FaultKind


def _count(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def _seconds(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"


def _fault_rows(faults: Sequence[FaultRecord], counts: dict[FaultKind, int]) -> list[str]:
    rows = []
    for kind in FaultKind:
        mine = [f for f in faults if f.kind is kind]
        if not mine and not counts.get(kind):
            continue  # a kind of the other stack (single PostgreSQL or cluster)
        recovered = [f.recovery_s for f in mine if f.recovery_s is not None]
        events = sum(f.kills for f in mine) if kind in KILLING_KINDS else len(mine)
        outage = [f.ended_s - f.began_s for f in mine]
        rows.append(
            f"| {kind.value} | {DESCRIPTION[kind]} | {counts.get(kind, 0)} | {len(mine)} |"
            f" {events} | {_seconds(outage)} | {_seconds(recovered)} |"
            f" {len(mine) - len(recovered)} |"
        )
    return rows


def render(result: CampaignResult, *, command: str) -> str:
    c, m = result.config, result.machine
    verdict = "PASSED" if result.ok else "FAILED"
    lines = [
        "# Reliability: the chaos campaign",
        "",
        f"Produced by `{command}` (`make chaos` runs the full campaign); rewritten by every run.",
        "The campaign starts a private stack on loopback (Mosquitto with mutual TLS,",
        "PostgreSQL as a Patroni cluster (`stack up --ha`: 3 etcd members, a primary and a"
        " synchronous standby; two brokers, meters and workers on both),"
        if c.ha
        else "PostgreSQL,",
        "Redis), the product as a user runs it (`meterproof ingest --workers "
        f"{c.workers}`, `meterproof bridge`",
        f"with {c.epoch_s}-second epochs) and a simulated fleet (`meterproof simulate`), injects",
        "the planned faults one at a time at seeded random moments under that steady load, lets",
        "everything settle, and audits. It exits non-zero on any loss, duplicate, unanchored",
        "reading, mint mismatch, `ledger verify` failure, or planned fault that did not happen",
        f"or was not recovered within {c.recovery_timeout_s:g} s.",
        "",
        f"## Run: {verdict}",
        "",
        f"- date: {m['date']} (started {result.started:%Y-%m-%d %H:%M:%S} UTC)",
        f"- machine: {m['cores']} cores ({m['cpu']}), {m['memory']}, {m['os']};"
        f" load average at start {m.get('load_average', '-')}",
        f"- versions: Python {m['python']}, {m['mosquitto']}, {m['postgresql']},"
        f" {m['redis']}, meterproof {m['meterproof']}",
        f"- bound {c.duration_s:.0f} s, took {result.elapsed_s:.0f} s: load {result.load_s:.0f} s"
        f" (first reading stored -> fleet done), final anchoring settle {result.settle_s:.0f} s",
        f"- fleet: {c.meters} meters, a reading every {c.interval_s:g} s each"
        f" ({c.readings_per_meter} per meter, ~{c.meters / c.interval_s:.0f} readings/s),"
        f" republish after {c.republish_after_s:g} s without receipt; seed {c.seed}",
        f"- outages: PostgreSQL {c.postgres_outage_s:g} s, Redis {c.redis_outage_s:g} s;"
        f" recovery timeout {c.recovery_timeout_s:g} s",
        "",
    ]
    problems = result.problems()
    if problems:
        lines += ["Problems:", "", *(f"- {p}" for p in problems), ""]
    lines += [
        "## Faults injected",
        "",
        "Recovery is the time from the end of a fault (process killed, server back up) until",
        "its backlog is drained: for ingest-side faults, until no reading written by a meter",
        "before that moment is still in any meter's outbox (a reading leaves its outbox only",
        "with its receipt, sent after commit); for the bridge, until every reading stored",
        "before that moment is in an anchored batch (this includes the epoch still open, up",
        f"to {c.epoch_s} s + {c.seal_delay_s:g} s seal delay). min / median / max, seconds.",
        "A recovery close to the meters' republish timer"
        f" ({c.republish_after_s:g} s) means a reading the broker",
        "had acknowledged got no receipt in time and was stored only once its meter",
        "republished it from its outbox.",
        "",
        "| fault | what | planned | injected | kills / stops | fault duration | recovery"
        " | not recovered |",
        "|---|---|---|---|---|---|---|---|",
        *_fault_rows(result.faults, result.plan.counts()),
        "",
    ]
    lines += _readings(result)
    lines += _HOW
    lines += _timeline(result.faults)
    return "\n".join(lines).rstrip() + "\n"


def _readings(result: CampaignResult) -> list[str]:
    a, fleet = result.audit, result.fleet
    if a is None:
        return ["## Readings", "", "No audit: the campaign stopped before it.", ""]
    s, anc, mint = a.store, a.anchor, a.mint
    rejected = ", ".join(f"{r} {n}" for r, n in a.rejected.items()) or "none"
    exits = (
        "; ".join(
            f"{name}: {', '.join(map(str, codes))}"
            for name, codes in result.unexpected_exits.items()
            if codes
        )
        or "none"
    )
    return [
        "## Readings",
        "",
        "Audited by (meter_id, seq) once the fleet had stopped and the product was stopped.",
        "",
        "| | readings |",
        "|---|---|",
        f"| generated (every meter's seqs 1..{result.config.readings_per_meter}) |"
        f" {s.generated:,} |",
        f"| sent, by the fleet's own count | {_count(fleet.get('sent'))} |",
        f"| stored (reading_log and readings) | {s.stored:,} |",
        f"| lost | {s.lost:,} |",
        f"| duplicated (extra rows in readings) | {s.duplicated:,} |",
        f"| stored but never generated | {s.unexpected:,} |",
        f"| anchored | {anc.anchored:,} |",
        f"| not anchored | {anc.unanchored:,} |",
        f"| republished by meters (no receipt in time) | {_count(fleet.get('republished'))} |",
        "",
        f"- anchoring: {anc.batches} anchored batches, {anc.ledger_entries} ledger entries"
        f" holding {anc.ledger_readings:,} readings; {anc.batch_count_mismatches} batches with"
        f" a wrong count, {anc.entry_mismatches} without exactly one entry",
        f"- minting: {mint.minted_units / 10**18:.3f} GRID to {mint.meters_minted} meters;"
        f" {mint.mismatches} meters differ from the mint rule recomputed from the registers",
        f"- `ledger verify`: {a.verify_line}",
        f"- rejected by ingest: {rejected}",
        f"- product processes that exited on their own (restarted): {exits}",
        *(f"- {e}" for e in (*s.examples, *mint.examples)),
        "",
    ]


_HOW = [
    "## What the audit checks",
    "",
    "- generated: a fresh fleet that is never restarted takes seqs 1..R in order, so every",
    "  meter generated exactly seqs 1..R (R = readings per meter); the fleet's own count of",
    "  readings sent must agree;",
    "- stored exactly once: each (meter_id, seq) in `reading_log` (primary key) and exactly",
    "  one row in the partitioned `readings` (its unique key holds per partition only, so",
    "  copies are counted there); nothing stored that no meter generated;",
    "- anchored exactly once: every stored reading's batch is anchored, each anchored batch's",
    "  count equals the readings naming it, each batch has exactly one ledger entry (by",
    "  idempotency key), and the entries' counts add up to the anchored readings;",
    "- `meterproof ledger verify` (roots, hash chain, signatures, mints, balances) exits 0;",
    "- minted GRID per meter equals the mint rule recomputed from the stored registers:",
    "  highest anchored export minus the export of the meter's first anchored reading.",
    "",
    "How to run: `make chaos` (this report, <= 15 minutes), `meterproof chaos --quick`",
    "(every fault kind, <= 3 minutes, report in `.run/reliability-quick.md`), `--seed`,",
    "`--meters`, `--duration`, `--work-dir` (keeps the stack's logs and the meters' state).",
    "`--ha` runs it on the Patroni cluster of `stack up --ha` with its own faults (kill -9 of",
    "the primary, a paused primary, switchover, an etcd member lost, a frozen standby, a",
    "broker lost, a paused broker) in place of the PostgreSQL stop (`--ha --quick`: <= 5",
    "minutes, report in `.run/reliability-ha-quick.md`).",
    "`tests/test_chaos.py` runs a smaller campaign with every fault kind of the single",
    "PostgreSQL inside `make test`; `tests/test_ha.py` each cluster fault under a worker;",
    "`tests/test_chaos_ha.py` how the campaign counts the cluster's faults (a failover that",
    "never shows, a server already down) against the real cluster.",
    "",
]


def _timeline(faults: Sequence[FaultRecord]) -> list[str]:
    rows = [
        f"| {n} | {f.planned_s:.1f} | {f.began_s:.1f} | {f.kind.value} | {f.variant} |"
        f" {f.ended_s - f.began_s:.1f} |"
        f" {'-' if f.recovery_s is None else f'{f.recovery_s:.1f}'} | {f.note} |"
        for n, f in enumerate(faults, 1)
    ]
    return [
        "## Every fault",
        "",
        "Seconds since the first reading was stored. A fault starts at its planned moment, or",
        "later when the one before it recovered late.",
        "",
        "| # | planned | began | fault | variant | duration | recovery | note |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


#: What follows this line in the report is hand-written (the failover design and the
#: figures the HA tests measured) and survives every run.
KEPT_MARKER: Final = "<!-- hand-written from here on: meterproof chaos keeps it -->"


def write(result: CampaignResult, path: Path, *, command: str) -> None:
    """Render the run, keeping the hand-written part of an existing report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    _, marker, kept = old.partition(KEPT_MARKER)
    path.write_text(render(result, command=command) + marker + kept, encoding="utf-8")
