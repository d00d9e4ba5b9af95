"""`meterproof demo --sink evm`: the bridge anchors on a local EVM dev node instead of the
PostgreSQL ledger. The node (ganache, 1-second blocks) keeps its chain in the run folder,
with the admin and oracle accounts funded at genesis; GridAnchor is deployed once and
reused while the node holds it, so a second demo extends the same chain."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psycopg
from eth_account.signers.local import LocalAccount

from meterproof.bridge.evm.claims import evm_destination
from meterproof.bridge.evm.client import Deployment, connect, contracts, load_key, new_key
from meterproof.bridge.evm.deploy import deploy
from meterproof.bridge.mint import format_grid
from meterproof.stack.chain import ChainNode

Say = Callable[[str], None]
Cli = Callable[..., subprocess.CompletedProcess[str]]
RPC_PORT: Final = 8545
CONFIRMATIONS: Final = 2


@dataclass(frozen=True, slots=True)
class DemoChain:
    node: ChainNode
    deployment: Deployment
    environ: dict[str, str]  #: what the bridge and `ledger`/`chain` commands need


def _key(path: Path) -> LocalAccount:
    return load_key(path) if path.exists() else new_key(path)


def start_chain(run_dir: Path) -> DemoChain:
    folder = run_dir / "evm"
    admin, oracle = _key(folder / "admin.key"), _key(folder / "oracle.key")
    funded = [("0x" + bytes(a.key).hex()) for a in (admin, oracle)]
    node = ChainNode(directory=run_dir / "chain", funded=funded, port=RPC_PORT, block_time_s=1)
    node.start()
    w3 = connect(node.url, timeout_s=30)
    contracts_file = folder / "contracts.json"
    deployment = Deployment.load(contracts_file) if contracts_file.exists() else None
    if deployment is None or not w3.eth.get_code(w3.to_checksum_address(deployment.anchor)):
        deployment = deploy(w3, admin, oracle.address)
        deployment.save(contracts_file)
    environ = {
        "METERPROOF_SINK": "evm",
        "METERPROOF_EVM_RPC_URL": node.url,
        "METERPROOF_EVM_CHAIN_ID": str(deployment.chain_id),
        "METERPROOF_EVM_CONTRACTS_FILE": str(contracts_file.resolve()),
        "METERPROOF_EVM_ORACLE_KEY_FILE": str((folder / "oracle.key").resolve()),
        "METERPROOF_EVM_CONFIRMATIONS": str(CONFIRMATIONS),
        "METERPROOF_SINK_TIMEOUT_S": "10",
    }
    return DemoChain(node, deployment, environ)


def chain_summary(chain: DemoChain, database_url: str, cli: Cli, say: Say) -> bool:
    """Transactions, GRID on chain per wallet and in claim trees, one reading's proof
    accepted by the contract's view, and `ledger verify` against the chain."""
    w3 = connect(chain.node.url, timeout_s=30)
    anchor, grid = contracts(w3, chain.deployment)
    with psycopg.connect(database_url) as conn:
        anchored = conn.execute(
            "SELECT batch, receipt->>'reference', (receipt->>'position')::bigint"
            " FROM bridge_batches WHERE status = 'anchored' ORDER BY batch DESC LIMIT 5"
        ).fetchall()
        wallets = conn.execute("SELECT DISTINCT owner_wallet FROM bridge_mints").fetchall()
        latest = conn.execute(
            "SELECT encode(l.reading_hash, 'hex') FROM reading_log l JOIN bridge_batches b"
            " ON b.batch = l.batch_id WHERE b.status = 'anchored' ORDER BY l.stored_at DESC"
            " LIMIT 1"
        ).fetchone()
    say(f"    GridAnchor {chain.deployment.anchor}, GRID {chain.deployment.grid},"
        f" chain {chain.deployment.chain_id} at {chain.node.url}")  # fmt: skip
    say(f"    anchoring transactions ({CONFIRMATIONS} confirmations each), newest first:")
    for batch, tx_hash, block in anchored:
        say(f"      batch {batch:>4}  block {block:>6}  {tx_hash}")
    addresses = sorted({a for (w,) in wallets if (a := evm_destination(w)) is not None})
    for address in addresses:
        say(f"    GRID of {address}: {format_grid(grid.functions.balanceOf(address).call())}")
    claimable = 0
    for batch in range(1, int(anchor.functions.head().call()) + 1):
        stored = anchor.functions.batches(batch).call()
        claimable += stored[6] - stored[7]
    say(f"    GRID claimable in claim trees (no EVM wallet linked): {format_grid(claimable)}")
    say(f"    total supply: {format_grid(grid.functions.totalSupply().call())} GRID")
    verify = cli("ledger", "verify")
    for line in (verify.stdout.strip() or verify.stderr.strip()).splitlines():
        say(f"    ledger verify: {line}")
    if latest is None:
        return False
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as proof_file:
        proof_file.write(cli("ledger", "proof", str(latest[0])).stdout)
    checked = cli("chain", "check-proof", proof_file.name)
    Path(proof_file.name).unlink()
    verdict = checked.stdout.strip() or checked.stderr.strip()
    say(f"    proof of reading {str(latest[0])[:16]}.. on chain: {verdict}")
    say(f"    the EVM dev node keeps running: kill $(cat {chain.node.pid_file}) stops it")
    return verify.returncode == 0 and checked.returncode == 0
