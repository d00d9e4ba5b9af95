"""Deploy GridAnchor (which creates GRID) from the committed artifact, from the admin
account, naming the oracle account; returns where it landed."""

from __future__ import annotations

from eth_account.signers.local import LocalAccount
from web3 import Web3

from meterproof.bridge.evm.client import Deployment, NodeUnavailableError, node_call
from meterproof.bridge.evm.compile import load_artifact


def deploy(w3: Web3, admin: LocalAccount, oracle: str, *, timeout_s: float = 60) -> Deployment:
    artifact = load_artifact("GridAnchor")
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    chain_id = node_call(lambda: w3.eth.chain_id)
    tx = factory.constructor(admin.address, oracle).build_transaction(
        {
            "from": admin.address,
            "nonce": node_call(lambda: w3.eth.get_transaction_count(admin.address)),
            "chainId": chain_id,
        }
    )
    signed = admin.sign_transaction(tx)
    tx_hash = node_call(lambda: w3.eth.send_raw_transaction(signed.raw_transaction))
    receipt = node_call(lambda: w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout_s))
    if receipt["status"] != 1 or receipt["contractAddress"] is None:
        raise NodeUnavailableError(f"deployment transaction {tx_hash.to_0x_hex()} failed")
    address = receipt["contractAddress"]
    anchor = w3.eth.contract(address=address, abi=artifact.abi)
    grid = node_call(lambda: anchor.functions.grid().call())
    return Deployment(chain_id, address, grid, int(receipt["blockNumber"]), admin.address, oracle)
