"""The `evm` ledger sink: one `GridAnchor.anchor` transaction per batch, counted as
anchored only once it is N blocks deep.

Exactly once rests on three things, in this order: the chain is asked first (`fetch`
reads the batch at depth N, so a receipt names a confirmed anchor); every transaction is
journalled before it is broadcast, so after a crash the bridge rebroadcasts, waits for or
replaces (same nonce, higher fees) what it already sent instead of sending anew; and the
contract accepts one anchor per batch id, so any double send reverts with
`AlreadyAnchored`, which the sink reads as "look it up", never as a failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import ContractLogicError, TransactionNotFound
from web3.logs import DISCARD
from web3.types import TxReceipt

from meterproof.bridge.entry import Entry
from meterproof.bridge.evm.claims import Plan, plan
from meterproof.bridge.evm.client import (
    ZERO_HASH,
    Deployment,
    NodeUnavailableError,
    contracts,
    node_call,
    revert_name,
)
from meterproof.bridge.evm.journal import Journal, Sent
from meterproof.bridge.faults import crash_point
from meterproof.bridge.ledger.sink import (
    Receipt,
    SinkPendingError,
    SinkRejectedError,
    SinkUnavailableError,
)

_NAME: Final = "evm"
#: Replacement fees: ganache and geth need at least +10% on both fee fields.
_BUMP: Final = 1.25
_GAS_MARGIN: Final = 1.2
#: Reverts of anchor() and what the runner does about them.
_REJECTED: Final = {
    "OutOfOrder": "out_of_order",
    "NotOracle": "invalid_entry",
    "BadHeader": "invalid_entry",
    "BadCommitment": "invalid_entry",
}


class EvmSink:
    def __init__(
        self,
        w3: Web3,
        deployment: Deployment,
        *,
        oracle: LocalAccount,
        journal: Journal,
        confirmations: int,
        direct_max: int,
        stall_s: float,
        timeout_s: float,
        priority_fee_wei: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._w3 = w3
        self._deployment = deployment
        self._anchor, _ = contracts(w3, deployment)
        self._oracle = oracle
        self._journal = journal
        self._confirmations = confirmations
        self._direct_max = direct_max
        self._stall_s = stall_s
        self._timeout_s = timeout_s
        self._priority_fee = priority_fee_wei
        self._clock = clock
        self._chain_checked = False

    @property
    def name(self) -> str:
        return _NAME

    def close(self) -> None:
        """Nothing held open: each call is one HTTP request."""

    def fetch(self, idempotency_key: str) -> Receipt | None:
        try:
            return self._confirmed(_batch_of(idempotency_key), idempotency_key)
        except NodeUnavailableError as exc:
            raise SinkUnavailableError(str(exc)) from exc

    def submit(self, entry: Entry, idempotency_key: str) -> Receipt:
        if idempotency_key != entry.header.idempotency_key:
            raise SinkRejectedError(
                "invalid_entry", f"key {idempotency_key} does not name the entry"
            )
        try:
            found = self._confirmed(entry.header.batch, idempotency_key)
            if found is not None:
                return found
            tx_hash = self._send(entry, idempotency_key)
            self._await_receipt(entry, tx_hash)
            return self._await_confirmations(entry.header.batch, idempotency_key)
        except NodeUnavailableError as exc:
            raise SinkUnavailableError(str(exc)) from exc

    def _plan(self, entry: Entry) -> Plan:
        return plan(entry.header.batch, entry.mints, direct_max=self._direct_max)

    def _check_chain(self) -> None:
        if self._chain_checked:
            return
        chain_id = node_call(lambda: self._w3.eth.chain_id)
        if chain_id != self._deployment.chain_id:
            raise SinkRejectedError(
                "conflict",
                f"the node is chain {chain_id}, the contracts are on {self._deployment.chain_id}",
            )
        self._chain_checked = True

    def _confirmed(self, batch: int, key: str) -> Receipt | None:
        """The receipt of the batch's anchor once N blocks deep; None if the chain does not
        hold it; SinkPendingError while it is shallower."""
        self._check_chain()
        latest = node_call(lambda: self._w3.eth.block_number)
        if self._entry_hash(batch, latest) == ZERO_HASH:
            return None
        deep = latest - self._confirmations + 1
        if deep < self._deployment.block or self._entry_hash(batch, deep) == ZERO_HASH:
            raise SinkPendingError(
                f"batch {batch} is anchored at block <= {latest}, not yet"
                f" {self._confirmations} blocks deep"
            )
        event = self._anchoring_event(batch, key, deep)
        block = node_call(lambda: self._w3.eth.get_block(event["blockNumber"]))
        return Receipt(
            sink=_NAME,
            position=int(event["blockNumber"]),
            entry_hash=bytes(event["args"]["entryHash"]),
            reference=event["transactionHash"].to_0x_hex(),
            recorded_at_ms=int(block["timestamp"]) * 1000,
        )

    def _anchoring_event(self, batch: int, key: str, deep: int) -> Any:  # noqa: ANN401 - web3 event
        """The Anchored event of the batch: from the receipt of our own journalled
        transaction (a node serves receipts of canonical blocks only), else from the node's
        event index (an anchor another bridge sent). The anchor itself was already read
        from the contract's state at depth N; this only names its transaction."""
        for sent in reversed(self._journal.sent(key)):
            try:
                receipt = self._receipt(sent.tx_hash)
            except TransactionNotFound:
                continue
            number = receipt["blockNumber"]
            if receipt["status"] != 1 or number is None or number > deep:
                continue
            events = self._anchor.events.Anchored().process_receipt(receipt, errors=DISCARD)
            if events:
                return events[0]
        logs = node_call(
            lambda: self._anchor.events.Anchored.get_logs(
                from_block=self._deployment.block, to_block=deep, argument_filters={"batch": batch}
            )
        )
        if not logs:
            raise SinkUnavailableError(f"batch {batch} is anchored but its event is not served")
        return logs[-1]

    def _receipt(self, tx_hash: bytes) -> TxReceipt:
        return node_call(lambda: self._w3.eth.get_transaction_receipt(HexBytes(tx_hash)))

    def _entry_hash(self, batch: int, block: int) -> bytes:
        record = node_call(
            lambda: self._anchor.functions.batches(batch).call(block_identifier=block)
        )
        return bytes(record[0])

    def _send(self, entry: Entry, key: str) -> bytes:
        """The hash of the transaction now carrying this batch: one already sent and still
        waiting, a rebroadcast of it, its replacement by nonce, or a new one."""
        address = self._oracle.address
        mined_nonce = node_call(lambda: self._w3.eth.get_transaction_count(address, "latest"))
        sent = self._journal.sent(key)
        last = sent[-1] if sent else None
        if last is not None and last.nonce >= mined_nonce:
            try:
                node_call(lambda: self._w3.eth.get_transaction(HexBytes(last.tx_hash)))
            except TransactionNotFound:  # the node lost it (restart, reorg): same bytes again
                self._broadcast(last.raw)
                return last.tx_hash
            if (self._clock() * 1000 - last.sent_at_ms) / 1000 < self._stall_s:
                return last.tx_hash
            bumped = (_bumped(last.max_fee_wei), _bumped(last.priority_fee_wei))
            return self._sign_and_send(entry, key, last.nonce, bumped)
        return self._sign_and_send(entry, key, mined_nonce, None)

    def _call(self, entry: Entry) -> Any:  # noqa: ANN401 - a web3 contract function
        p = self._plan(entry)
        return self._anchor.functions.anchor(
            entry.header.encode(),
            entry.signature,
            (p.root, len(p.leaves), p.claim_total),
            [address for address, _ in p.direct],
            [units for _, units in p.direct],
        )

    def _sign_and_send(
        self, entry: Entry, key: str, nonce: int, fees: tuple[int, int] | None
    ) -> bytes:
        call = self._call(entry)
        try:
            gas = node_call(lambda: call.estimate_gas({"from": self._oracle.address}))
        except ContractLogicError as exc:
            raise self._reverted(entry, exc) from exc
        if fees is None:
            base = int(node_call(lambda: self._w3.eth.get_block("latest"))["baseFeePerGas"])
            fees = (2 * base + self._priority_fee, self._priority_fee)
        tx = call.build_transaction(
            {
                "from": self._oracle.address,
                "nonce": nonce,
                "gas": int(gas * _GAS_MARGIN),
                "maxFeePerGas": fees[0],
                "maxPriorityFeePerGas": fees[1],
                "chainId": self._deployment.chain_id,
            }
        )
        signed = self._oracle.sign_transaction(tx)
        sent = Sent(bytes(signed.hash), nonce, fees[0], fees[1], bytes(signed.raw_transaction))
        self._journal.record(
            key, chain_id=self._deployment.chain_id, sender=self._oracle.address, sent=sent
        )
        self._broadcast(sent.raw)
        crash_point("during_submit")  # sent, and no receipt seen yet
        return sent.tx_hash

    def _broadcast(self, raw: bytes) -> None:
        try:
            node_call(lambda: self._w3.eth.send_raw_transaction(raw))
        except NodeUnavailableError as exc:
            if "already" not in str(exc).lower() and "known" not in str(exc).lower():
                raise

    def _reverted(self, entry: Entry, exc: ContractLogicError) -> Exception:
        name = revert_name(self._anchor.abi, exc.data)
        if name == "AlreadyAnchored":  # a double send: the chain has it, look it up
            return SinkPendingError(f"batch {entry.header.batch} is already anchored on chain")
        code = _REJECTED.get(name or "")
        if code is None:
            return SinkUnavailableError(f"anchor() reverted: {name or exc}")
        return SinkRejectedError(code, f"anchor() reverts with {name}")  # type: ignore[arg-type]

    def _await_receipt(self, entry: Entry, tx_hash: bytes) -> TxReceipt:
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                receipt = self._receipt(tx_hash)
                break
            except TransactionNotFound:
                if time.monotonic() > deadline:
                    raise SinkUnavailableError(
                        f"transaction 0x{tx_hash.hex()} not mined yet"
                    ) from None
                time.sleep(0.05)
        if receipt["status"] != 1:
            try:
                node_call(
                    lambda: self._call(entry).call(
                        {"from": self._oracle.address}, block_identifier=receipt["blockNumber"]
                    )
                )
            except ContractLogicError as exc:
                raise self._reverted(entry, exc) from exc
            raise SinkUnavailableError(f"transaction 0x{tx_hash.hex()} reverted")
        return receipt

    def _await_confirmations(self, batch: int, key: str) -> Receipt:
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                found = self._confirmed(batch, key)
            except SinkPendingError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
                continue
            if found is None:
                raise SinkUnavailableError(f"batch {batch} was mined, then left the chain")
            return found


def _batch_of(key: str) -> int:
    try:
        return int(key.split(":")[1])
    except (IndexError, ValueError):
        raise SinkRejectedError("invalid_entry", f"not an idempotency key: {key}") from None


def _bumped(fee: int) -> int:
    return max(fee + 1, int(fee * _BUMP) + 1)
