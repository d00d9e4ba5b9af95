"""web3.py against one EVM JSON-RPC endpoint: the deployed contracts, the oracle account,
and every node failure turned into one `NodeUnavailableError`.

Nothing here is ganache-specific: the same calls work against Energy Web Chain or any
EVM RPC (chain id, URL and confirmations are settings).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3Exception
from web3.types import TxReceipt

from meterproof.bridge.evm.compile import load_artifact
from meterproof.errors import InputError, UnavailableError

T = TypeVar("T")
ZERO_HASH: Final = bytes(32)


class NodeUnavailableError(UnavailableError):
    """The node did not answer, timed out, or answered with an RPC error."""

    def __init__(self, detail: str) -> None:
        super().__init__("evm node", detail)


@dataclass(frozen=True, slots=True)
class Deployment:
    """Where the contracts are: `chain deploy` writes it, the sink and `ledger verify` read it."""

    chain_id: int
    anchor: str
    grid: str
    block: int  #: the deployment's block: event scans start here
    admin: str
    oracle: str

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Deployment:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(
                f"contracts file {path}: {exc}; run `meterproof chain deploy`"
            ) from None


def load_key(path: Path) -> LocalAccount:
    """A 0x-hex private key file (mode 0600): the oracle or the admin account."""
    try:
        account: LocalAccount = Account.from_key(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise InputError(f"EVM key {path}: {exc}") from None
    return account


def new_key(path: Path) -> LocalAccount:
    """Create a key file that only its owner can read; refuses to overwrite one."""
    account: LocalAccount = Account.create()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("x") as out:
        path.chmod(0o600)
        out.write("0x" + bytes(account.key).hex() + "\n")
    return account


def connect(url: str, *, timeout_s: float) -> Web3:
    """No retries inside web3: the bridge's runner retries with its own backoff."""
    provider = Web3.HTTPProvider(
        url, request_kwargs={"timeout": timeout_s}, exception_retry_configuration=None
    )
    return Web3(provider)


def node_call(call: Callable[[], T]) -> T:
    """Run one web3 call; a transport or RPC failure becomes NodeUnavailableError. A revert
    (ContractLogicError) and an unknown transaction (TransactionNotFound) are answers, not
    outages: they pass through for the caller to read."""
    try:
        return call()
    except (ContractLogicError, TransactionNotFound):
        raise
    except (requests.RequestException, OSError, Web3Exception) as exc:
        raise NodeUnavailableError(f"{type(exc).__name__}: {str(exc)[:200]}") from exc


def transact(w3: Web3, account: LocalAccount, call: Any, *, timeout_s: float) -> TxReceipt:  # noqa: ANN401 - a web3 contract call or constructor
    """Sign `call` as `account` at its next nonce, send it and wait for the mined receipt
    (reverted or not: the caller reads `status`). For one-off transactions; the sink's
    anchors go through its journal instead."""
    tx = call.build_transaction(
        {
            "from": account.address,
            "nonce": node_call(lambda: w3.eth.get_transaction_count(account.address)),
            "chainId": node_call(lambda: w3.eth.chain_id),
        }
    )
    signed = account.sign_transaction(tx)
    tx_hash = node_call(lambda: w3.eth.send_raw_transaction(signed.raw_transaction))
    return node_call(lambda: w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout_s))


def contracts(w3: Web3, deployment: Deployment) -> tuple[Contract, Contract]:
    """(GridAnchor, GRID) bound to their addresses."""
    anchor_address = Web3.to_checksum_address(deployment.anchor)
    grid_address = Web3.to_checksum_address(deployment.grid)
    anchor = w3.eth.contract(address=anchor_address, abi=load_artifact("GridAnchor").abi)
    grid = w3.eth.contract(address=grid_address, abi=load_artifact("GRID").abi)
    return anchor, grid


def revert_name(abi: Any, data: Any) -> str | None:  # noqa: ANN401 - web3's ABI and error data
    """The custom error a revert carries (`AlreadyAnchored`, `NotOracle`, ...), if ours."""
    if isinstance(data, dict):
        data = data.get("data")
    if not isinstance(data, str) or len(data) < 10:
        return None
    selector = data[:10].lower()
    for item in abi:
        if item.get("type") == "error":
            types = ",".join(i["type"] for i in item.get("inputs", []))
            signature = f"{item['name']}({types})"
            if Web3.keccak(text=signature)[:4].to_0x_hex() == selector:
                return str(item["name"])
    return None
