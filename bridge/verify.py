"""`ledger verify`: rebuild the whole ledger from the stored readings and compare.

Entry by entry, in ledger order, stopping at the first discrepancy:
  - the chain: consecutive sequence numbers, header bytes that encode the row's columns,
    entry_hash = SHA-256(header), prev_hash = the previous entry's hash, the idempotency
    key, the trusted oracle key and its Ed25519 signature over the header;
  - the mint list: it hashes to the header's mint_hash, units = export Wh * 10**15;
  - the readings of that batch: each reading_hash recomputed from the stored fields (an
    edited reading), present in both `readings` and `reading_log` (a deleted one), then the
    count and the RFC 6962 root over them in (ts, meter_id, seq) order;
  - the mints, replayed from those readings with the bridge's rule (bridge.mint);
and at the end every other stored reading is rehashed, nothing stored is missing from
the work queue, the wallet balances equal the sums of the mints, and the bridge's record of
each anchored batch names the ledger's entry.

Entries whose readings retention removed (`retired_batches`, a prefix; db/retention.py)
get the chain and mint-list checks only: their readings are gone, and the mint replay
continues after the last of them from the state retention recorded (`retired_mint_state`).

One sorted COPY streams all rows; a second connection walks the ledger beside it.

With a chain as the ledger (`BRIDGE_RECORD`), the walk reads the bridge's own record of
the anchored entries instead of the local ledger's tables, and `bridge.evm.audit`
compares that record with the chain's state and events.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg
from psycopg.rows import tuple_row

from meterproof.bridge.entry import GENESIS, Entry, EntryError, Header
from meterproof.bridge.mint import MeterBatch, MeterState, Mint, advance
from meterproof.bridge.rehash import reading_hash
from meterproof.schemas.merkle import merkle_root

_NULL: Final = b"\\N"
_ROWS: Final = """COPY (
    SELECT l.batch_id, l.meter_id, l.seq, l.reading_hash, r.reading_hash,
           (extract(epoch FROM r.ts) * 1000)::bigint, r.import_wh, r.export_wh,
           r.power_w, r.voltage_mv, r.current_ma, r.frequency_mhz, r.power_factor_milli,
           l.ts = r.ts AND l.import_wh = r.import_wh AND l.export_wh = r.export_wh
    FROM reading_log l
    LEFT JOIN readings r ON r.meter_id = l.meter_id AND r.seq = l.seq
    ORDER BY l.batch_id NULLS LAST, l.ts, l.meter_id COLLATE "C", l.seq
) TO STDOUT"""
_ENTRIES: Final = """
SELECT seq, idempotency_key, epoch, epoch_ms, prev_hash, merkle_root, reading_count,
       mint_hash, oracle_key, header, signature, entry_hash, minted_units
FROM ledger_entries ORDER BY seq
"""
_LEDGER_MINTS: Final = """
SELECT entry, meter_id, wallet, export_delta_wh, import_delta_wh, grid_units
FROM ledger_mints ORDER BY entry, meter_id COLLATE "C"
"""
_UNLOGGED: Final = """
SELECT r.meter_id, r.seq, r.reading_hash FROM readings r
WHERE NOT EXISTS (SELECT 1 FROM reading_log l WHERE l.meter_id = r.meter_id AND l.seq = r.seq)
ORDER BY r.ts, r.meter_id COLLATE "C", r.seq LIMIT 1
"""
_BALANCES: Final = """
SELECT coalesce(m.wallet, b.wallet), m.units, b.grid_units
FROM (SELECT wallet, sum(grid_units) AS units FROM ledger_mints
      WHERE wallet IS NOT NULL GROUP BY wallet HAVING sum(grid_units) > 0) m
FULL JOIN ledger_balances b ON b.wallet = m.wallet
ORDER BY 1
"""
_RETIRED: Final = "SELECT coalesce(max(batch), 0), count(*) FROM retired_batches"
_RETIRED_STATES: Final = """
SELECT meter_id, baseline_export_wh, baseline_import_wh, max_export_wh, max_import_wh,
       first_batch, last_batch
FROM retired_mint_state
"""
_BRIDGE_RECORD: Final = """
SELECT b.batch, b.entry_hash, e.entry_hash FROM bridge_batches b
LEFT JOIN ledger_entries e ON e.seq = b.batch
WHERE b.status = 'anchored' AND e.entry_hash IS DISTINCT FROM b.entry_hash
ORDER BY b.batch LIMIT 1
"""


#: The bridge's anchored entries in the local ledger's column shape (header slices: the
#: prev hash at byte 28, the mint hash at 100, the oracle key at 132; SQL counts from 1).
_BRIDGE_ENTRIES: Final = """
SELECT batch, idempotency_key, epoch, epoch_ms, substring(header from 29 for 32), merkle_root,
       reading_count, substring(header from 101 for 32), substring(header from 133 for 32),
       header, signature, entry_hash, minted_units
FROM bridge_batches WHERE status = 'anchored' ORDER BY batch
"""
_BRIDGE_MINTS: Final = """
SELECT m.batch, m.meter_id, m.owner_wallet, m.export_delta_wh, m.import_delta_wh, m.grid_units
FROM bridge_mints m JOIN bridge_batches b USING (batch)
WHERE b.status = 'anchored' ORDER BY m.batch, m.meter_id COLLATE "C"
"""


@dataclass(frozen=True, slots=True)
class EntrySource:
    """Where the walk reads the anchored entries: the local ledger's tables (then its
    balances and the bridge's record are checked against them too), or the bridge's own
    record (when the ledger is a chain, audited against the bridge's record separately)."""

    entries: str
    mints: str
    local_ledger: bool


LOCAL_LEDGER: Final = EntrySource(_ENTRIES, _LEDGER_MINTS, local_ledger=True)
BRIDGE_RECORD: Final = EntrySource(_BRIDGE_ENTRIES, _BRIDGE_MINTS, local_ledger=False)


@dataclass(frozen=True, slots=True)
class Discrepancy:
    entry: int | None
    reading: str | None
    detail: str

    def __str__(self) -> str:
        where = [f"entry {self.entry}"] if self.entry is not None else []
        if self.reading is not None:
            where.append(f"reading {self.reading}")
        return f"{', '.join(where) or 'ledger'}: {self.detail}"


@dataclass(slots=True)
class Report:
    entries: int = 0
    retired_entries: int = 0
    anchored_readings: int = 0
    rehashed: int = 0
    wallets: int = 0
    minted_units: int = 0
    discrepancy: Discrepancy | None = None


class _Found(Exception):  # noqa: N818 - control flow: the first discrepancy ends the walk
    def __init__(self, discrepancy: Discrepancy) -> None:
        self.discrepancy = discrepancy


def _fail(detail: str, *, entry: int | None = None, reading: str | None = None) -> _Found:
    return _Found(Discrepancy(entry, reading, detail))


@dataclass(slots=True)
class _Row:
    batch: int | None
    meter_id: str
    seq: int
    log_hash: bytes
    stored_hash: bytes | None
    ts_ms: int
    import_wh: int
    export_wh: int
    computed: bytes | None
    log_matches: bool  #: reading_log's ts and registers equal the stored reading's

    @property
    def name(self) -> str:
        return f"{self.meter_id}/{self.seq} ({self.log_hash.hex()})"


def _hex(field_: bytes) -> bytes:
    return bytes.fromhex(field_[3:].decode())  # text COPY writes bytea as \\x...


def _rows(conn: psycopg.Connection[Any]) -> Iterator[_Row]:
    """Parsed and rehashed; a reading missing from `readings` has no stored fields."""
    with conn.cursor() as cur, cur.copy(_ROWS) as copy:
        rest = b""
        for block in copy:
            lines = (rest + bytes(block)).split(b"\n")
            rest = lines.pop()
            for line in lines:
                f = line.split(b"\t")
                batch = None if f[0] == _NULL else int(f[0])
                meter_id, seq, log_hash = f[1].decode(), int(f[2]), _hex(f[3])
                if f[4] == _NULL:
                    yield _Row(batch, meter_id, seq, log_hash, None, 0, 0, 0, None, False)
                    continue
                ts, imp, exp = int(f[5]), int(f[6]), int(f[7])
                optional = [None if x == _NULL else int(x) for x in f[8:13]]
                computed = reading_hash(meter_id, (seq, ts, imp, exp), optional)
                yield _Row(
                    batch, meter_id, seq, log_hash, _hex(f[4]), ts, imp, exp, computed,
                    f[13] == b"t",
                )  # fmt: skip


def _check_reading(row: _Row, entry: int | None) -> None:
    if row.stored_hash is None:
        raise _fail("is missing from the readings table (deleted)", entry=entry, reading=row.name)
    if not row.log_matches:
        raise _fail(
            "its ts or registers in reading_log differ from the stored reading (edited)",
            entry=entry,
            reading=row.name,
        )
    if row.computed != row.stored_hash or row.computed != row.log_hash:
        computed = row.computed.hex() if row.computed else "?"
        raise _fail(f"its stored fields hash to {computed} (edited)", entry=entry, reading=row.name)


@dataclass(slots=True)
class _Replay:
    """The bridge's mint rule, replayed from the readings alone."""

    states: dict[str, MeterState] = field(default_factory=dict)

    def mints(self, batch: int, rows: list[_Row]) -> dict[str, tuple[int, int]]:
        firsts: dict[str, _Row] = {}
        tops: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in rows:  # (ts, meter_id, seq) order: a meter's first row is its first reading
            firsts.setdefault(r.meter_id, r)
            top = tops[r.meter_id]
            top[0] = max(top[0], r.export_wh)
            top[1] = max(top[1], r.import_wh)
        expected: dict[str, tuple[int, int]] = {}
        for meter_id, first in firsts.items():
            top = tops[meter_id]
            agg = MeterBatch(meter_id, first.export_wh, first.import_wh, top[0], top[1])
            state, export_delta, import_delta = advance(agg, self.states.get(meter_id), batch)
            self.states[meter_id] = state
            if export_delta or import_delta:
                expected[meter_id] = (export_delta, import_delta)
        return expected


def verify(
    conn: psycopg.Connection[Any],
    ledger: psycopg.Connection[Any],
    trusted_key: bytes,
    *,
    source: EntrySource = LOCAL_LEDGER,
) -> Report:
    """`conn` streams the readings, `ledger` (another connection) walks the entries."""
    report = Report()
    try:
        _walk(conn, ledger, trusted_key, report, source)
    except _Found as found:
        report.discrepancy = found.discrepancy
    return report


def _walk(
    conn: psycopg.Connection[Any],
    ledger: psycopg.Connection[Any],
    trusted_key: bytes,
    report: Report,
    source: EntrySource,
) -> None:
    conn.execute("SET work_mem = '256MB'")
    retired_through, retired_states = _retirement(conn)
    rows = _rows(conn)
    pending: _Row | None = next(rows, None)
    replay = _Replay()
    prev = GENESIS
    with (
        ledger.transaction(),
        ledger.cursor("verify_entries", row_factory=tuple_row) as entries,
        ledger.cursor("verify_mints", row_factory=tuple_row) as mint_rows,
    ):
        entries.execute(source.entries)
        mint_rows.execute(source.mints)
        mints = _LedgerMints(iter(mint_rows))
        for expected_seq, row in enumerate(entries, start=1):
            entry = _check_entry(row, expected_seq, prev, trusted_key, mints)
            retired = expected_seq <= retired_through
            batch: list[_Row] = []
            while pending is not None and pending.batch is not None:
                if pending.batch > expected_seq:
                    break
                if pending.batch < expected_seq:
                    raise _fail("is claimed by a batch the ledger has no entry for",
                                entry=pending.batch, reading=pending.name)  # fmt: skip
                if not retired:  # else a row retention has yet to delete
                    _check_reading(pending, expected_seq)
                    batch.append(pending)
                pending = next(rows, None)
            if retired:
                report.retired_entries += 1
                if expected_seq == retired_through:
                    replay.states = dict(retired_states)
            else:
                _check_batch(entry, batch, replay)
            report.entries += 1
            report.anchored_readings += len(batch)
            report.rehashed += len(batch)
            report.minted_units += entry.minted_units
            prev = entry.header.entry_hash
    if report.entries < retired_through:
        raise _fail("retention retired batches the ledger has no entry for", entry=retired_through)
    while pending is not None:  # pending, open or unclaimed: rehash only
        _check_reading(pending, pending.batch)
        report.rehashed += 1
        pending = next(rows, None)
    _check_rest(conn, report, local_ledger=source.local_ledger)


def _retirement(conn: psycopg.Connection[Any]) -> tuple[int, dict[str, MeterState]]:
    """The last retired batch (0: none) and the mint state after it."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(_RETIRED).fetchone()
        assert row is not None
        through, count = int(row[0]), int(row[1])
        if count != through:
            raise _fail("the retired batches are not the first ones, in order", entry=through)
        states = {
            str(r[0]): MeterState(*(int(v) for v in r[1:]))
            for r in cur.execute(_RETIRED_STATES).fetchall()
        }
    return through, states


class _LedgerMints:
    """The ledger's mint rows, grouped by entry as the entries are walked in order."""

    def __init__(self, rows: Iterator[tuple[Any, ...]]) -> None:
        self._rows = rows
        self._next = next(rows, None)

    def take(self, seq: int) -> tuple[list[Mint], list[int]]:
        """(mints, their recorded units) of entry `seq`; an entry may have none."""
        mints: list[Mint] = []
        units: list[int] = []
        while self._next is not None and int(self._next[0]) == seq:
            _, meter_id, wallet, exp, imp, grid_units = self._next
            mints.append(Mint(str(meter_id), wallet, int(exp), int(imp)))
            units.append(int(grid_units))
            self._next = next(self._rows, None)
        return mints, units


def _check_entry(
    row: tuple[Any, ...],
    seq: int,
    prev: bytes,
    trusted_key: bytes,
    mints: _LedgerMints,
) -> Entry:
    if int(row[0]) != seq:
        raise _fail(f"the ledger jumps from entry {seq - 1} to {row[0]}", entry=seq)
    try:
        header = Header.decode(bytes(row[9]))
    except EntryError as exc:
        raise _fail(f"header bytes: {exc}", entry=seq) from None
    if header.batch != seq:
        raise _fail(f"holds the signed header of entry {header.batch} (reordered)", entry=seq)
    columns = (seq, *(int(v) for v in row[2:4]), *(bytes(v) for v in row[4:6]), int(row[6]))
    decoded = (
        header.batch,
        header.epoch,
        header.epoch_ms,
        header.prev_hash,
        header.merkle_root,
        header.reading_count,
    )
    if columns != decoded or (bytes(row[7]), bytes(row[8])) != (
        header.mint_hash,
        header.oracle_key,
    ):
        raise _fail("the row's columns differ from its signed header (edited)", entry=seq)
    if bytes(row[11]) != hashlib.sha256(bytes(row[9])).digest():
        raise _fail("entry_hash is not the SHA-256 of the header (edited)", entry=seq)
    if header.prev_hash != prev:
        raise _fail("prev_hash does not name the previous entry (reordered or edited)", entry=seq)
    if row[1] != header.idempotency_key:
        raise _fail("the idempotency key does not match the header", entry=seq)
    if header.oracle_key != trusted_key:
        raise _fail(f"signed by the untrusted key ed25519:{header.oracle_key.hex()}", entry=seq)
    listed, units = mints.take(seq)
    entry = Entry(header, bytes(row[10]), tuple(listed))
    problem = entry.problem()
    if problem is not None:
        raise _fail(problem, entry=seq)
    for mint, recorded in zip(listed, units, strict=True):
        if recorded != mint.units:
            raise _fail(
                f"meter {mint.meter_id}: {recorded} units for {mint.export_wh} Wh", entry=seq
            )
    if int(row[12]) != entry.minted_units:
        raise _fail("minted_units is not the sum of its mints", entry=seq)
    return entry


def _check_batch(entry: Entry, rows: list[_Row], replay: _Replay) -> None:
    h = entry.header
    if len(rows) != h.reading_count:
        raise _fail(
            f"{len(rows)} readings are claimed by this batch, the header says {h.reading_count}"
            " (deleted or added)",
            entry=h.batch,
        )
    if merkle_root([r.log_hash for r in rows]) != h.merkle_root:
        raise _fail("the Merkle root over its readings differs from the header", entry=h.batch)
    expected = replay.mints(h.batch, rows)
    listed = {m.meter_id: (m.export_wh, m.import_wh) for m in entry.mints}
    for meter_id in sorted(expected.keys() | listed.keys()):
        want, got = expected.get(meter_id, (0, 0)), listed.get(meter_id, (0, 0))
        if want != got:
            raise _fail(
                f"meter {meter_id}: the readings give export/import deltas {want} Wh, the"
                f" ledger minted {got}",
                entry=h.batch,
            )


def _check_rest(conn: psycopg.Connection[Any], report: Report, *, local_ledger: bool) -> None:
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(_UNLOGGED).fetchone()
        if row is not None:
            raise _fail(
                "is stored but missing from reading_log, so it can never be anchored",
                reading=f"{row[0]}/{row[1]} ({bytes(row[2]).hex()})",
            )
        if not local_ledger:
            return
        for wallet, summed, recorded in cur.execute(_BALANCES).fetchall():
            if summed != recorded:
                raise _fail(f"wallet {wallet}: balance {recorded}, its mints sum to {summed}")
            report.wallets += 1
        row = cur.execute(_BRIDGE_RECORD).fetchone()
        if row is not None:
            raise _fail("the bridge's anchored batch does not match the ledger", entry=int(row[0]))
