"""Deploy GridAnchor (which creates GRID) from the committed artifact, from the admin
account, naming the oracle account; returns where it landed."""

from __future__ import annotations

from eth_account.signers.local import LocalAccount
from web3 import Web3

from meterproof.bridge.evm.client import Deployment, NodeUnavailableError, node_call, transact
from meterproof.bridge.evm.compile import load_artifact


def deploy(w3: Web3, admin: LocalAccount, oracle: str, *, timeout_s: float = 60) -> Deployment:
    artifact = load_artifact("GridAnchor")
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    chain_id = node_call(lambda: w3.eth.chain_id)
    constructor = factory.constructor(admin.address, oracle)
    receipt = transact(w3, admin, constructor, timeout_s=timeout_s)
    if receipt["status"] != 1 or receipt["contractAddress"] is None:
        tx_hash = receipt["transactionHash"].to_0x_hex()
        raise NodeUnavailableError(f"deployment transaction {tx_hash} failed")
    address = receipt["contractAddress"]
    anchor = w3.eth.contract(address=address, abi=artifact.abi)
    grid = node_call(lambda: anchor.functions.grid().call())
    return Deployment(chain_id, address, grid, int(receipt["blockNumber"]), admin.address, oracle)
