"""The exactly-once audit, run once the campaign has settled.

Generated readings are known from the fleet (seq 1..R for each of its meters: a fresh
fleet, never restarted, takes its seqs in order). Against that the audit checks, by
(meter_id, seq):
- stored exactly once: in `reading_log` (primary key) and in the partitioned `readings`
  (whose unique key holds per partition only, so duplicates are counted there);
- anchored exactly once: each stored reading in an anchored batch, each anchored batch's
  count equal to its readings, one ledger entry per batch, the entries' counts adding up;
- `meterproof ledger verify` exits 0;
- minted totals per meter equal the mint rule (`bridge.mint`) recomputed from the stored
  registers and their batches.
The comparison itself (`compare`) is pure, so a test can feed it a corrupted store.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

from meterproof.bridge.mint import UNITS_PER_WH
from meterproof.config import StackEnv
from meterproof.stack.commands import command_environ, meterproof_argv

Key = tuple[str, int]
_EXAMPLES = 5


@dataclass(frozen=True, slots=True)
class StoreCheck:
    """Generated vs stored, by (meter_id, seq)."""

    generated: int
    stored: int
    lost: int
    duplicated: int
    unexpected: int
    #: In one of reading_log / readings but not the other.
    inconsistent: int
    examples: tuple[str, ...] = ()


def compare(
    generated: Mapping[str, int],
    log_keys: Iterable[Key],
    readings_rows: Iterable[Key],
) -> StoreCheck:
    """`generated` maps meter -> readings it generated (seqs 1..n); `log_keys` are
    reading_log's keys; `readings_rows` one key per row of `readings` (repeats = copies)."""
    expected = {(m, s) for m, n in generated.items() for s in range(1, n + 1)}
    logged = set(log_keys)
    copies = Counter(readings_rows)
    stored = logged | set(copies)
    lost = sorted(expected - stored)
    twice = sorted(k for k, n in copies.items() if n > 1)
    unexpected = sorted(stored - expected)
    inconsistent = sorted(logged.symmetric_difference(copies))
    examples = [f"lost {m} seq {s}" for m, s in lost[:_EXAMPLES]]
    examples += [f"{copies[k]} copies of {k[0]} seq {k[1]}" for k in twice[:_EXAMPLES]]
    examples += [f"never generated: {m} seq {s}" for m, s in unexpected[:_EXAMPLES]]
    examples += [
        f"only in {'reading_log' if k in logged else 'readings'}: {k[0]} seq {k[1]}"
        for k in inconsistent[:_EXAMPLES]
    ]
    return StoreCheck(
        generated=len(expected),
        stored=len(stored & expected),
        lost=len(lost),
        duplicated=sum(copies[k] - 1 for k in twice),
        unexpected=len(unexpected),
        inconsistent=len(inconsistent),
        examples=tuple(examples),
    )


@dataclass(frozen=True, slots=True)
class AnchorCheck:
    anchored: int
    unanchored: int
    batches: int
    #: Anchored batches whose reading_count differs from the readings that name them.
    batch_count_mismatches: int
    #: Anchored batches without exactly one ledger entry (by idempotency key).
    entry_mismatches: int
    ledger_entries: int
    ledger_readings: int


@dataclass(frozen=True, slots=True)
class MintCheck:
    meters_minted: int
    minted_units: int
    mismatches: int
    examples: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Audit:
    store: StoreCheck
    anchor: AnchorCheck
    mint: MintCheck
    verify_ok: bool
    verify_line: str
    rejected: dict[str, int] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """Every reason the campaign fails; empty when the audit is clean."""
        s, a, m = self.store, self.anchor, self.mint
        out = []
        if s.lost:
            out.append(f"{s.lost} readings lost")
        if s.duplicated:
            out.append(f"{s.duplicated} duplicate rows")
        if s.unexpected:
            out.append(f"{s.unexpected} stored readings no meter generated")
        if s.inconsistent:
            out.append(f"{s.inconsistent} readings in only one of reading_log/readings")
        if a.unanchored:
            out.append(f"{a.unanchored} stored readings not anchored")
        if a.batch_count_mismatches:
            out.append(f"{a.batch_count_mismatches} anchored batches with a wrong count")
        if a.entry_mismatches:
            out.append(f"{a.entry_mismatches} batches without exactly one ledger entry")
        if a.ledger_readings != a.anchored:
            out.append(f"ledger entries count {a.ledger_readings} readings, {a.anchored} anchored")
        if m.mismatches:
            out.append(f"{m.mismatches} meters minted other than the mint rule says")
        if not self.verify_ok:
            out.append(f"ledger verify failed: {self.verify_line}")
        return out

    @property
    def clean(self) -> bool:
        return not self.problems()


def _rows(conn: psycopg.Connection[Any], sql: str) -> list[tuple[Any, ...]]:
    return conn.execute(sql).fetchall()


def check_store(conn: psycopg.Connection[Any], generated: Mapping[str, int]) -> StoreCheck:
    log_keys = [(str(m), int(s)) for m, s in _rows(conn, "SELECT meter_id, seq FROM reading_log")]
    readings = [(str(m), int(s)) for m, s in _rows(conn, "SELECT meter_id, seq FROM readings")]
    return compare(generated, log_keys, readings)


def check_anchoring(conn: psycopg.Connection[Any]) -> AnchorCheck:
    (anchored, unanchored, batches, count_bad, entry_bad, entries, entry_readings), *_ = _rows(
        conn,
        """
        SELECT
          (SELECT count(*) FROM reading_log l JOIN bridge_batches b ON b.batch = l.batch_id
            WHERE b.status = 'anchored'),
          (SELECT count(*) FROM reading_log l LEFT JOIN bridge_batches b ON b.batch = l.batch_id
            WHERE b.status IS DISTINCT FROM 'anchored'),
          (SELECT count(*) FROM bridge_batches WHERE status = 'anchored'),
          (SELECT count(*) FROM bridge_batches b
            WHERE b.status = 'anchored' AND b.reading_count <>
              (SELECT count(*) FROM reading_log l WHERE l.batch_id = b.batch)),
          (SELECT count(*) FROM bridge_batches b
            WHERE b.status = 'anchored' AND
              (SELECT count(*) FROM ledger_entries e
                WHERE e.idempotency_key = b.idempotency_key) <> 1),
          (SELECT count(*) FROM ledger_entries),
          (SELECT coalesce(sum(reading_count), 0) FROM ledger_entries)
        """,
    )
    return AnchorCheck(
        anchored=int(anchored),
        unanchored=int(unanchored),
        batches=int(batches),
        batch_count_mismatches=int(count_bad),
        entry_mismatches=int(entry_bad),
        ledger_entries=int(entries),
        ledger_readings=int(entry_readings),
    )


def expected_mints(rows: Iterable[tuple[str, int, int, int, int]]) -> dict[str, int]:
    """The mint rule from the registers: (highest anchored export - export of the meter's
    first anchored reading, in (batch, ts, seq) order) in GRID base units. Rows are
    (meter_id, batch, ts_ms, seq, export_wh) in any order."""
    first: dict[str, tuple[int, int, int, int]] = {}
    top: dict[str, int] = {}
    for meter_id, batch, ts, seq, export in rows:
        key = (batch, ts, seq, export)
        if meter_id not in first or key < first[meter_id]:
            first[meter_id] = key
        top[meter_id] = max(top.get(meter_id, export), export)
    out = {m: (top[m] - f[3]) * UNITS_PER_WH for m, f in first.items()}
    return {m: units for m, units in out.items() if units}


def check_mints(conn: psycopg.Connection[Any]) -> MintCheck:
    rows = [
        (str(m), int(b), int(t), int(s), int(e))
        for m, b, t, s, e in _rows(
            conn,
            "SELECT l.meter_id, l.batch_id, (extract(epoch FROM l.ts) * 1000)::bigint, l.seq,"
            " l.export_wh FROM reading_log l JOIN bridge_batches b ON b.batch = l.batch_id"
            " WHERE b.status = 'anchored'",
        )
    ]
    want = expected_mints(rows)
    minted = {
        str(m): int(u)
        for m, u in _rows(conn, "SELECT meter_id, sum(grid_units) FROM ledger_mints GROUP BY 1")
    }
    wrong = sorted(m for m in want.keys() | minted.keys() if want.get(m, 0) != minted.get(m, 0))
    return MintCheck(
        meters_minted=sum(1 for units in minted.values() if units),
        minted_units=sum(minted.values()),
        mismatches=len(wrong),
        examples=tuple(
            f"{m}: minted {minted.get(m, 0)}, rule says {want.get(m, 0)}" for m in wrong[:_EXAMPLES]
        ),
    )


def ledger_verify(env: StackEnv) -> tuple[bool, str]:
    """The operator's own command, so the audit trusts nothing the campaign computed."""
    done = subprocess.run(
        meterproof_argv("ledger", "verify"),
        env=command_environ(env),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    line = (done.stdout.strip() or done.stderr.strip() or f"exit {done.returncode}").splitlines()
    return done.returncode == 0, line[-1]


def rejected_by_reason(conn: psycopg.Connection[Any]) -> dict[str, int]:
    rows = _rows(conn, "SELECT reason, count(*) FROM rejected_readings GROUP BY 1 ORDER BY 1")
    return {str(r): int(n) for r, n in rows}


def run_audit(env: StackEnv, generated: Mapping[str, int]) -> Audit:
    with psycopg.connect(env.database_url) as conn:
        store = check_store(conn, generated)
        anchor = check_anchoring(conn)
        mint = check_mints(conn)
        rejected = rejected_by_reason(conn)
    ok, line = ledger_verify(env)
    return Audit(store, anchor, mint, ok, line, rejected)
