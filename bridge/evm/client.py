"""web3.py against one EVM JSON-RPC endpoint: the deployed contracts, the oracle account,
and every node failure turned into one `NodeUnavailableError`.

Nothing here is ganache-specific: the same calls work against Energy Web Chain or any
EVM RPC (chain id, URL and confirmations are settings).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import requests
from eth_abi.abi import decode
from eth_abi.exceptions import DecodingError
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3Exception
from web3.types import TxReceipt

from meterproof.bridge.evm.compile import load_artifact
from meterproof.certs.errors import SharedKeyError
from meterproof.certs.keys import refuse_shared
from meterproof.errors import InputError, UnavailableError

T = TypeVar("T")
ZERO_HASH: Final = bytes(32)
#: An EVM key file's mode: its owner reads and writes it, no one else.
KEY_FILE_MODE: Final = 0o600


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
    """A 0x-hex private key file, mode 0600: the oracle or the admin account. One that its
    group or others may read is refused: whoever could read it may hold the account."""
    try:
        with path.open() as handle:
            mode = os.fstat(handle.fileno()).st_mode & 0o777
            text = handle.read()
    except OSError as exc:
        raise InputError(f"EVM key {path}: {exc}") from None
    try:
        refuse_shared(path, mode)
    except SharedKeyError as exc:
        raise InputError(f"EVM key {path} {exc}") from None
    try:
        account: LocalAccount = Account.from_key(text.strip())
    except ValueError as exc:
        raise InputError(f"EVM key {path}: {exc}") from None
    return account


def new_key(path: Path) -> LocalAccount:
    """Create a key file that only its owner can read, mode 0600 from its first byte (as
    certs/keys.py writes the PKI's keys); refuses to overwrite one or follow a link."""
    account: LocalAccount = Account.create()
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(path, flags, KEY_FILE_MODE), "w") as out:
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
    found = revert_error(abi, data)
    return None if found is None else found[0]


def revert_error(abi: Any, data: Any) -> tuple[str, tuple[Any, ...]] | None:  # noqa: ANN401 - web3's ABI and error data
    """(name, arguments) of the custom error a revert carries, if `abi` declares it; the
    arguments are empty when they do not decode. `data` is the revert data as web3.py
    passes it on: hex, or the node's error object (ganache's `eth_estimateGas` puts the
    revert data under `result`)."""
    if isinstance(data, dict):
        data = data.get("data") or data.get("result")
    if not isinstance(data, str) or len(data) < 10:
        return None
    selector = data[:10].lower()
    for item in abi:
        if item.get("type") == "error":
            types = [i["type"] for i in item.get("inputs", [])]
            signature = f"{item['name']}({','.join(types)})"
            if Web3.keccak(text=signature)[:4].to_0x_hex() == selector:
                try:
                    args = tuple(decode(types, bytes.fromhex(data[10:])))
                except (ValueError, DecodingError):
                    args = ()
                return str(item["name"]), args
    return None
