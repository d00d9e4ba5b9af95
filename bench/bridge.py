"""Benchmark: one epoch of N readings (default 1,000,000) sealed, anchored and verified.

`bench_bridge(database_url)` needs a freshly migrated database with nothing stored. It
registers meters, writes readings into `readings` and `reading_log` with binary COPY in
chunks, as ingest commits them, with real reading hashes, and, when `progressive`, lets the
bridge claim after every chunk as the running bridge does while an epoch is open. Then it
times what the targets are about: sealing at the epoch's close (final claim, leaves,
Merkle root, mints, signed entry), the local sink's append, and `ledger verify`.
With `progressive=False` every reading is still unclaimed at the close, the worst case after
a bridge outage, and the seal includes claiming them all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from meterproof.bench.limits import COPY_LOG, LOG_TYPES
from meterproof.bridge.batches import BatchStore
from meterproof.bridge.epochs import Epoch, containing
from meterproof.bridge.ledger.local import LocalSink
from meterproof.bridge.oracle import Oracle
from meterproof.bridge.rehash import reading_hash
from meterproof.bridge.verify import verify
from meterproof.schemas.signatures import Ed25519Public, generate_private_key
from meterproof.schemas.timestamps import ms_to_dt, wall_ms

EPOCH_MS: Final = 900_000
_WALLETS: Final = 100
_READINGS_COPY: Final = (
    "COPY readings (meter_id, seq, ts, import_wh, export_wh, power_w, alg, sig, reading_hash,"
    " received_at, verified_at) FROM STDIN (FORMAT BINARY)"
)
_READING_TYPES: Final = [
    "text", "numeric", "timestamptz", "numeric", "numeric", "int8", "text", "bytea", "bytea",
    "timestamptz", "timestamptz",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class BridgeBench:
    readings: int
    meters: int
    progressive: bool
    generate_s: float  #: writing the rows (not a target)
    claim_s: float  #: all claims while the epoch was open (0 unless progressive)
    claim_steps: int
    seal_s: float  #: at the close: final claim, root, mints, signed entry (target < 10 s)
    anchor_s: float  #: local sink append: entry, mints, balances (counted in the 10 s)
    verify_s: float  #: `ledger verify` of everything (target < 30 s)

    @property
    def seal_and_anchor_s(self) -> float:
        return self.seal_s + self.anchor_s


def bench_bridge(
    database_url: str,
    *,
    readings: int = 1_000_000,
    meters: int = 10_000,
    chunk: int = 50_000,
    progressive: bool = True,
) -> BridgeBench:
    if not 1 <= meters <= readings or chunk < 1:
        raise ValueError("need 1 <= meters <= readings and chunk >= 1")
    key = generate_private_key("EdDSA")
    public = key.public_key()
    assert isinstance(public, Ed25519Public)
    oracle = Oracle(key, public.raw)
    # The newest epoch that closed at least a day ago: inside the partitions migrate creates.
    epoch = containing(wall_ms() - 86_400_000, EPOCH_MS)
    with psycopg.connect(database_url, autocommit=True) as conn:
        _check_empty(conn)
        store = BatchStore(conn)
        t = time.perf_counter()
        _register(conn, meters)
        generate_s, claim_s = time.perf_counter() - t, 0.0
        steps = 0
        for rows in _chunks(epoch, readings, meters, chunk):
            t = time.perf_counter()
            _write(conn, rows)
            generate_s += time.perf_counter() - t
            if progressive:
                t = time.perf_counter()
                store.advance(epoch.start_ms, epoch_ms=EPOCH_MS, delay_ms=0, oracle=oracle)
                claim_s += time.perf_counter() - t
                steps += 1
        t = time.perf_counter()
        step = store.advance(epoch.end_ms, epoch_ms=EPOCH_MS, delay_ms=0, oracle=oracle)
        seal_s = time.perf_counter() - t
        assert len(step.sealed) == 1
        assert step.sealed[0].header.reading_count == readings
        sink = LocalSink(database_url, trusted_key=oracle.public_key, timeout_s=60)
        t = time.perf_counter()
        pending = store.first_pending()
        assert pending is not None
        receipt = sink.submit(pending.entry, pending.entry.header.idempotency_key)
        store.mark_anchored(pending.batch, receipt)
        anchor_s = time.perf_counter() - t
        sink.close()
        t = time.perf_counter()
        with psycopg.connect(database_url, autocommit=True) as ledger:
            report = verify(conn, ledger, oracle.public_key)
        verify_s = time.perf_counter() - t
    if report.discrepancy is not None or report.anchored_readings != readings:
        raise AssertionError(f"verify disagrees with the benchmark: {report}")
    return BridgeBench(
        readings=readings,
        meters=meters,
        progressive=progressive,
        generate_s=generate_s,
        claim_s=claim_s,
        claim_steps=steps,
        seal_s=seal_s,
        anchor_s=anchor_s,
        verify_s=verify_s,
    )


def _check_empty(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute(
        "SELECT (SELECT count(*) FROM reading_log) + (SELECT count(*) FROM bridge_batches)"
    ).fetchone()
    if row is None or row[0]:
        raise ValueError("bench_bridge needs a freshly migrated database with no readings")


def _meter(m: int) -> str:
    return f"bench-{m:07d}"


def _register(conn: psycopg.Connection[Any], meters: int) -> None:
    with (
        conn.cursor() as cur,
        cur.copy("COPY meters (meter_id, status, owner_wallet) FROM STDIN") as copy,
    ):
        for m in range(meters):
            copy.write_row((_meter(m), "active", f"wallet-{m % _WALLETS:03d}"))


Row = tuple[str, int, int, int, int, int, bytes]


def _chunks(epoch: Epoch, readings: int, meters: int, chunk: int) -> Iterator[list[Row]]:
    """Rows (meter_id, seq, ts_ms, import_wh, export_wh, power_w, hash) in arrival order:
    every meter reports, then every meter again, and so on, spread over the epoch."""
    per_meter = -(-readings // meters)
    spacing = epoch.length_ms // per_meter
    rows: list[Row] = []
    for n in range(readings):
        i, m = divmod(n, meters)
        meter_id = _meter(m)
        ts = epoch.start_ms + i * spacing + m % spacing
        imp, exp, power = 1_000_000 + 7 * i, 50_000 + (m % 13) * i, (m % 5000) - 2500
        digest = reading_hash(meter_id, (i, ts, imp, exp), (power, None, None, None, None))
        rows.append((meter_id, i, ts, imp, exp, power, digest))
        if len(rows) == chunk:
            yield rows
            rows = []
    if rows:
        yield rows


def _write(conn: psycopg.Connection[Any], rows: list[Row]) -> None:
    """One transaction per chunk, both tables, as ingest's store does."""
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(COPY_LOG) as copy:
            copy.set_types(LOG_TYPES)
            for meter_id, seq, ts, imp, exp, _power, digest in rows:
                copy.write_row((meter_id, seq, digest, ms_to_dt(ts), imp, exp))
        with cur.copy(_READINGS_COPY) as copy:
            copy.set_types(_READING_TYPES)
            sig = bytes(64)
            for meter_id, seq, ts, imp, exp, power, digest in rows:
                at = ms_to_dt(ts)
                copy.write_row((meter_id, seq, at, imp, exp, power, "EdDSA", sig, digest, at, at))
