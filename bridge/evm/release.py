"""Release claim leaves of meters that had no EVM wallet when their batch was sealed, now
that one is linked: the oracle attests the current link (`meters.owner_wallet`, which the
wallet-link history maintains) by calling `GridAnchor.release` for each such leaf.

The contract's claimed bitmap makes a release happen once: a leaf already claimed is
skipped (`isClaimed`), and a race with another release reverts with `AlreadyClaimed`.

The oracle account is the bridge's too. Each release transaction is sent under the
account's nonce lock (journal.py), after checking that no anchoring transaction the bridge
journalled is still waiting to be mined: a release then would take its nonce (and one of
the two would be dropped). So the run stops there (`anchor_in_flight`: a log line, the
metric's `deferred` outcome, and an error saying to run it again), and the bridge, which
cannot journal while the lock is held, waits for the release transaction instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import psycopg
import structlog
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3

from meterproof.bridge.evm.audit import anchored_entries, anchored_plan, stored_batch
from meterproof.bridge.evm.claims import ZERO_ADDRESS, evm_destination
from meterproof.bridge.evm.client import Deployment, contracts, node_call, transact
from meterproof.bridge.evm.journal import in_flight, nonce_lock_key
from meterproof.bridge.telemetry import RELEASES
from meterproof.errors import UnavailableError

log = structlog.get_logger("bridge.evm")
_OWNERS: Final = "SELECT meter_id, owner_wallet FROM meters WHERE meter_id = ANY(%s)"


class AnchorInFlightError(UnavailableError):
    """The bridge has an anchoring transaction of the oracle account not mined yet."""

    code: Final = "anchor_in_flight"

    def __init__(self, tx_hash: bytes, nonce: int) -> None:
        super().__init__(
            "evm oracle account",
            f"{self.code}: the bridge's anchoring transaction 0x{tx_hash.hex()} (nonce"
            f" {nonce}) is not mined yet; run `chain release` again once it is",
        )


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
            with _nonce_held(conn, w3, deployment, oracle.address):
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


@contextmanager
def _nonce_held(
    conn: psycopg.Connection[Any], w3: Web3, deployment: Deployment, sender: ChecksumAddress
) -> Iterator[None]:
    """The account's nonce lock, held while one release transaction is sent and mined,
    once no transaction the bridge journalled is in flight."""
    key = nonce_lock_key(deployment.chain_id, sender)
    conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    try:
        mined = node_call(lambda: w3.eth.get_transaction_count(sender, "latest"))
        found = in_flight(conn, chain_id=deployment.chain_id, sender=sender, mined_nonce=mined)
        if found is not None:
            RELEASES.labels(outcome="deferred").inc()
            log.warning("release_deferred", reason=AnchorInFlightError.code,
                        tx=f"0x{found[0].hex()}", nonce=found[1])  # fmt: skip
            raise AnchorInFlightError(*found)
        yield
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def _claimed(anchor: Any, batch: int, index: int) -> bool:  # noqa: ANN401 - a web3 contract
    return bool(node_call(lambda: anchor.functions.isClaimed(batch, index).call()))
