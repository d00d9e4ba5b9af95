"""`ledger verify` with the `evm` sink, the chain's half: every anchored batch of the
bridge's record against the contract's state and events.

Per batch: the stored entry hash, reading root and count equal the signed header's; the
claim tree (root, leaf count, total) and the direct mints equal what the mint list gives
(in whichever of the two forms the batch was anchored); exactly one Anchored event.
Then GRID: minted per wallet (Transfer events from the zero address) equals the direct
mints plus the claims and releases, every batch's claimed sum is what its Claimed events
add up to and at most its claim total, and the total supply is all of it. The contract
may hold one batch more than the record says is anchored (sent, not yet marked): that
pending batch is checked as an anchored one and its GRID counted (its direct mints are in
GRID's Transfer events already); a second pending batch on chain is a discrepancy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg.rows import tuple_row
from web3 import Web3

from meterproof.bridge.entry import Entry, Header
from meterproof.bridge.evm.claims import Plan, plan
from meterproof.bridge.evm.client import Deployment, contracts, node_call
from meterproof.bridge.mint import Mint

_BATCHES: Final = """
SELECT batch, status, header, signature FROM bridge_batches
WHERE status IN ('anchored', 'pending') ORDER BY batch
"""
_MINTS: Final = """
SELECT meter_id, owner_wallet, export_delta_wh, import_delta_wh FROM bridge_mints
WHERE batch = %s ORDER BY meter_id COLLATE "C"
"""
_ZERO: Final = "0x" + "00" * 20


@dataclass(slots=True)
class ChainReport:
    batches: int = 0  #: anchors checked, `unmarked` included
    unmarked: int = 0  #: of which pending in the record: on chain, not yet marked (0 or 1)
    wallets: int = 0
    direct_units: int = 0
    claim_units: int = 0  #: committed to claim trees
    claimed_units: int = 0  #: of which claimed or released
    total_supply: int = 0
    discrepancy: str | None = None


class _Found(Exception):  # noqa: N818 - control flow: the first discrepancy ends the audit
    pass


def audit_chain(conn: psycopg.Connection[Any], w3: Web3, deployment: Deployment) -> ChainReport:
    report = ChainReport()
    try:
        _audit(conn, w3, deployment, report)
    except _Found as found:
        report.discrepancy = str(found)
    return report


def anchored_entries(conn: psycopg.Connection[Any]) -> Iterator[tuple[str, Entry]]:
    """(status, entry) of every anchored or pending batch, in batch order."""
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(_BATCHES).fetchall()
        for batch, status, header, signature in rows:
            mints = tuple(
                Mint(str(m), w, int(e), int(i)) for m, w, e, i in cur.execute(_MINTS, (batch,))
            )
            yield str(status), Entry(Header.decode(bytes(header)), bytes(signature), mints)


def stored_batch(anchor: Any, batch: int) -> Any:  # noqa: ANN401 - a web3 contract and tuple
    return node_call(lambda: anchor.functions.batches(batch).call())


def anchored_plan(entry: Entry, stored: Any) -> Plan | None:  # noqa: ANN401 - a web3 tuple
    """The plan this batch was anchored with (everything direct it could, or all in the
    tree), told apart by what the chain stored; None if neither matches."""
    for direct_max in (10**9, -1):
        p = plan(entry.header.batch, entry.mints, direct_max=direct_max)
        if (bytes(stored[2]), stored[5], stored[6], stored[8]) == (
            p.root, len(p.leaves), p.claim_total, p.direct_total,
        ):  # fmt: skip
            return p
    return None


def _audit(
    conn: psycopg.Connection[Any], w3: Web3, deployment: Deployment, report: ChainReport
) -> None:
    anchor, grid = contracts(w3, deployment)
    events = node_call(lambda: anchor.events.Anchored.get_logs(from_block=deployment.block))
    anchored_events: dict[int, int] = defaultdict(int)
    for event in events:
        anchored_events[int(event["args"]["batch"])] += 1
    head = int(node_call(lambda: anchor.functions.head().call()))
    minted_expected: dict[str, int] = defaultdict(int)
    last_anchored = 0
    for status, entry in anchored_entries(conn):
        h = entry.header
        if status == "pending" and h.batch > head:
            continue  # sealed, not on chain yet
        stored = stored_batch(anchor, h.batch)
        if status == "pending":
            _unmarked(h, stored, last_anchored, report)
        elif report.unmarked:
            raise _Found(f"batch {h.batch}: anchored in the record after a pending batch")
        else:
            last_anchored = h.batch
        _audit_batch(entry, stored, anchored_events.get(h.batch, 0), minted_expected, report)
    if head != last_anchored + report.unmarked:
        raise _Found(f"the chain's head is batch {head}, the record's {last_anchored}")
    _audit_grid(anchor, grid, deployment, minted_expected, report)


def _unmarked(h: Header, stored: Any, last_anchored: int, report: ChainReport) -> None:  # noqa: ANN401 - a web3 tuple
    """A pending batch the chain holds: the one after the last anchored, sent and not yet
    marked, with the same entry; any other is a discrepancy."""
    if bytes(stored[0]) != h.entry_hash:
        raise _Found(f"batch {h.batch}: the chain holds another entry")
    if report.unmarked:
        raise _Found(
            f"batch {h.batch}: a second batch on chain that the record has not marked"
            " anchored (one may be: sent, not yet marked)"
        )
    if h.batch != last_anchored + 1:
        raise _Found(
            f"batch {h.batch}: on chain and pending in the record, whose last anchored"
            f" batch is {last_anchored}"
        )
    report.unmarked += 1


def _audit_batch(
    entry: Entry,
    stored: Any,  # noqa: ANN401 - a web3 tuple
    events: int,
    minted_expected: dict[str, int],
    report: ChainReport,
) -> None:
    """One anchor on chain against the record's entry and mints; its direct mints are
    added to what GRID's Transfer events must show."""
    h = entry.header
    if bytes(stored[0]) != h.entry_hash:
        raise _Found(f"batch {h.batch}: anchored in the record, the chain holds {stored[0].hex()}")
    if (bytes(stored[1]), stored[4]) != (h.merkle_root, h.reading_count):
        raise _Found(f"batch {h.batch}: the chain's reading root or count differs")
    if events != 1:
        raise _Found(f"batch {h.batch}: {events} Anchored events")
    p = anchored_plan(entry, stored)
    if p is None:
        raise _Found(f"batch {h.batch}: the claim tree or direct mints differ from its mints")
    for address, units in p.direct:
        minted_expected[address] += units
    report.direct_units += p.direct_total
    report.claim_units += p.claim_total
    if stored[7] > stored[6]:
        raise _Found(f"batch {h.batch}: claimed {stored[7]} of a claim total {stored[6]}")
    report.batches += 1


def _audit_grid(
    anchor: Any,  # noqa: ANN401 - web3 contracts
    grid: Any,  # noqa: ANN401
    deployment: Deployment,
    minted_expected: dict[str, int],
    report: ChainReport,
) -> None:
    claimed: dict[int, int] = defaultdict(int)
    for event in node_call(lambda: anchor.events.Claimed.get_logs(from_block=deployment.block)):
        args = event["args"]
        claimed[int(args["batch"])] += int(args["amount"])
        minted_expected[str(args["account"])] += int(args["amount"])
        report.claimed_units += int(args["amount"])
    for batch, units in claimed.items():
        on_chain = stored_batch(anchor, batch)[7]
        if on_chain != units:
            raise _Found(f"batch {batch}: claimed {on_chain}, its Claimed events add up to {units}")
    minted: dict[str, int] = defaultdict(int)
    for event in node_call(
        lambda: grid.events.Transfer.get_logs(
            from_block=deployment.block, argument_filters={"from": _ZERO}
        )
    ):
        minted[str(event["args"]["to"])] += int(event["args"]["value"])
    for wallet in sorted(minted_expected.keys() | minted.keys()):
        if minted.get(wallet, 0) != minted_expected.get(wallet, 0):
            raise _Found(
                f"wallet {wallet}: {minted.get(wallet, 0)} GRID units minted on chain,"
                f" {minted_expected.get(wallet, 0)} by the record"
            )
    report.wallets = len(minted)
    report.total_supply = int(node_call(lambda: grid.functions.totalSupply().call()))
    if report.total_supply != sum(minted.values()):
        raise _Found(f"total supply {report.total_supply}, minted {sum(minted.values())}")
