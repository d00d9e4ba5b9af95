"""Release claim leaves of meters that had no EVM wallet when their batch was sealed, now
that one is linked: the oracle attests the current link (`meters.owner_wallet`, which the
wallet-link history maintains) by calling `GridAnchor.release` for each such leaf.

The contract's claimed bitmap makes a release happen once: a leaf already claimed is
skipped (`isClaimed`), and a race with another release reverts with `AlreadyClaimed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import psycopg
import structlog
from eth_account.signers.local import LocalAccount
from web3 import Web3

from meterproof.bridge.evm.audit import anchored_entries, anchored_plan, stored_batch
from meterproof.bridge.evm.claims import ZERO_ADDRESS, evm_destination
from meterproof.bridge.evm.client import Deployment, contracts, node_call, transact
from meterproof.bridge.telemetry import RELEASES

log = structlog.get_logger("bridge.evm")
_OWNERS: Final = "SELECT meter_id, owner_wallet FROM meters WHERE meter_id = ANY(%s)"


@dataclass(frozen=True, slots=True)
class Released:
    batch: int
    index: int
    meter_id: str
    to: str
    units: int
    tx_hash: str


def release_linked(
    conn: psycopg.Connection[Any],
    w3: Web3,
    deployment: Deployment,
    oracle: LocalAccount,
    *,
    timeout_s: float,
) -> list[Released]:
    """Send every unclaimed zero-account leaf of the anchored batches to its meter's
    current EVM wallet; meters still without one are left claimable."""
    anchor, _ = contracts(w3, deployment)
    done: list[Released] = []
    for status, entry in anchored_entries(conn):
        if status != "anchored":
            continue
        batch = entry.header.batch
        plan = anchored_plan(entry, stored_batch(anchor, batch))
        if plan is None:
            continue  # `ledger verify` reports it
        waiting = [(i, leaf) for i, leaf in enumerate(plan.leaves) if leaf.account == ZERO_ADDRESS]
        if not waiting:
            continue
        rows = conn.execute(_OWNERS, ([leaf.meter_id for _, leaf in waiting],)).fetchall()
        owners = {str(m): evm_destination(w) for m, w in rows}
        for index, leaf in waiting:
            to = owners.get(leaf.meter_id)
            if to is None or _claimed(anchor, batch, index):
                continue
            call = anchor.functions.release(
                batch, index, leaf.units, leaf.meter_id, plan.proof(index), to
            )
            receipt = transact(w3, oracle, call, timeout_s=timeout_s)
            tx_hash = receipt["transactionHash"].to_0x_hex()
            if receipt["status"] != 1:
                RELEASES.labels(outcome="reverted").inc()
                log.warning("release_reverted", batch=batch, index=index, tx=tx_hash)
                continue
            RELEASES.labels(outcome="released").inc()
            log.info("grid_released", batch=batch, meter_id=leaf.meter_id, to=to, tx=tx_hash)
            done.append(Released(batch, index, leaf.meter_id, to, leaf.units, tx_hash))
    return done


def _claimed(anchor: Any, batch: int, index: int) -> bool:  # noqa: ANN401 - a web3 contract
    return bool(node_call(lambda: anchor.functions.isClaimed(batch, index).call()))
