"""The `evm` ledger sink: one `GridAnchor.anchor` transaction per batch, counted as
anchored only once it is N blocks deep.

Exactly once rests on three things, in this order: the chain is asked first (`fetch`
reads the batch at depth N, so a receipt names a confirmed anchor); every transaction is
journalled before it is broadcast, so after a crash the bridge rebroadcasts, waits for or
replaces (same nonce, higher fees) what it already sent instead of sending anew; and the
contract accepts one anchor per batch id, so any double send reverts with
`AlreadyAnchored`, which the sink reads as "look it up", never as a failure.

A journalled transaction is waited for `stall_s` (its age by the database's clock, which
stamped it), then replaced, whether the node still holds it in its pool or not: one the
node dropped and now refuses (underpriced, evicted, its nonce taken by another transaction
of the account) is never sent again byte for byte forever.
"""

from __future__ import annotations

import re
import time
from typing import Any, Final

import structlog
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3RPCError
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
    revert_error,
)
from meterproof.bridge.evm.journal import Journal, Sent
from meterproof.bridge.faults import crash_point
from meterproof.bridge.ledger.sink import (
    Receipt,
    SinkPendingError,
    SinkRejectedError,
    SinkUnavailableError,
)
from meterproof.bridge.telemetry import REPLACEMENTS

log = structlog.get_logger("bridge.evm")

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
#: How nodes answer the broadcast of a transaction they hold already (geth since 1.9.25 and
#: its forks: "already known"; older geth: "known transaction: <hash>"; Nethermind:
#: "AlreadyKnown"; OpenEthereum: "... was already imported."): nothing to do. Matched on
#: the node's JSON-RPC error message only, never on a transport failure's text ("Name or
#: service not known" is DNS failing, not the node answering).
_ALREADY_KNOWN: Final = re.compile(
    r"\balready known\b|^known transaction\b|\balready imported\b|^alreadyknown$", re.IGNORECASE
)


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
    ) -> None:
        self._w3 = w3
        self._deployment = deployment
        self._anchor, grid = contracts(w3, deployment)
        #: GRID's errors (OpenZeppelin's ERC-20 ones, `NotMinter`) come out of anchor()
        #: unchanged from `grid.mint`, so a revert is decoded against both ABIs.
        grid_errors: list[Any] = [e for e in grid.abi if e.get("type") == "error"]
        self._grid_errors = frozenset(str(e["name"]) for e in grid_errors)
        self._errors_abi = [*self._anchor.abi, *grid_errors]
        self._oracle = oracle
        self._journal = journal
        self._confirmations = confirmations
        self._direct_max = direct_max
        self._stall_s = stall_s
        self._timeout_s = timeout_s
        self._priority_fee = priority_fee_wei
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
        waiting (rebroadcast if the node lost it: a restart, a reorg), its replacement by
        nonce once it is `stall_s` old, or a new one."""
        address = self._oracle.address
        mined_nonce = node_call(lambda: self._w3.eth.get_transaction_count(address, "latest"))
        sent = self._journal.sent(key)
        last = sent[-1] if sent else None
        if last is None or last.nonce < mined_nonce:
            return self._sign_and_send(entry, key, mined_nonce, None)
        pooled = self._pooled(last.tx_hash)
        if last.age_s < self._stall_s:
            if not pooled:
                self._broadcast(last.raw)
            return last.tx_hash
        fees = self._fees()  # never below what a new transaction pays now
        fees = (
            max(_bumped(last.max_fee_wei), fees[0]),
            max(_bumped(last.priority_fee_wei), fees[1]),
        )
        reason = "stalled" if pooled else "not_in_pool"
        REPLACEMENTS.labels(reason=reason).inc()
        log.warning(
            "anchor_replaced",
            batch=entry.header.batch,
            nonce=last.nonce,
            replaced=f"0x{last.tx_hash.hex()}",
            reason=reason,
            age_s=round(last.age_s, 1),
            max_fee_wei=fees[0],
            priority_fee_wei=fees[1],
        )
        return self._sign_and_send(entry, key, last.nonce, fees)

    def _pooled(self, tx_hash: bytes) -> bool:
        """Whether the node holds the transaction (in its pool: its nonce is not mined)."""
        try:
            node_call(lambda: self._w3.eth.get_transaction(HexBytes(tx_hash)))
        except TransactionNotFound:
            return False
        return True

    def _fees(self) -> tuple[int, int]:
        """(max fee, priority fee) of a new transaction: twice the base fee plus the tip."""
        base = int(node_call(lambda: self._w3.eth.get_block("latest"))["baseFeePerGas"])
        return 2 * base + self._priority_fee, self._priority_fee

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
            fees = self._fees()
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
        if not self._journal.record(
            key, chain_id=self._deployment.chain_id, sender=self._oracle.address, sent=sent
        ):
            raise SinkUnavailableError(
                "`chain release` is sending from the oracle account: anchoring waits for it"
            )
        self._broadcast(sent.raw)
        crash_point("during_submit")  # sent, and no receipt seen yet
        return sent.tx_hash

    def _broadcast(self, raw: bytes) -> None:
        try:
            node_call(lambda: self._w3.eth.send_raw_transaction(raw))
        except NodeUnavailableError as exc:
            if not already_known(exc):
                raise

    def _reverted(self, entry: Entry, exc: ContractLogicError) -> Exception:
        found = revert_error(self._errors_abi, exc.data)
        name = None if found is None else found[0]
        if name == "AlreadyAnchored":  # a double send: the chain has it, look it up
            return SinkPendingError(f"batch {entry.header.batch} is already anchored on chain")
        if found is not None and name in self._grid_errors:
            # GRID refuses one of the batch's mints (ERC20InvalidReceiver: the zero
            # address). Sending it again cannot change that: a named, permanent failure
            # (logged as an error, counted under invalid_entry), never skipped.
            args = ", ".join(str(a) for a in found[1])
            return SinkRejectedError(
                "invalid_entry",
                f"anchor() reverts with GRID's {name}({args}): the token refuses a mint of"
                f" batch {entry.header.batch}",
            )
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


def already_known(exc: NodeUnavailableError) -> bool:
    """Whether the node answered a broadcast with "I have this transaction already"."""
    cause = exc.__cause__
    if not isinstance(cause, Web3RPCError):
        return False  # a transport failure: the node did not answer at all
    response: Any = cause.rpc_response or {}
    error = response.get("error")
    message = error.get("message") if isinstance(error, dict) else cause.message
    return bool(_ALREADY_KNOWN.search(str(message).strip()))


def _batch_of(key: str) -> int:
    try:
        return int(key.split(":")[1])
    except (IndexError, ValueError):
        raise SinkRejectedError("invalid_entry", f"not an idempotency key: {key}") from None


def _bumped(fee: int) -> int:
    return max(fee + 1, int(fee * _BUMP) + 1)
