"""`meterproof demo --sink evm`: the bridge anchors on the stack's EVM dev node
(`stack.chain.start_dev_chain`: ganache with 1-second blocks in the run folder, GridAnchor
deployed once) instead of the PostgreSQL ledger, and the summary reads the chain."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Final

import psycopg

from meterproof.bridge.evm.claims import evm_destination
from meterproof.bridge.evm.client import connect, contracts
from meterproof.bridge.mint import format_grid
from meterproof.stack.chain import DevChain, start_dev_chain

Say = Callable[[str], None]
Cli = Callable[..., subprocess.CompletedProcess[str]]
CONFIRMATIONS: Final = 2


def start_chain(run_dir: Path) -> DevChain:
    """The stack's dev chain (`stack chain`): 1-second blocks, 2 confirmations."""
    chain = start_dev_chain(run_dir, block_time_s=1, confirmations=CONFIRMATIONS)
    return replace(chain, environ={**chain.environ, "METERPROOF_SINK_TIMEOUT_S": "10"})


def chain_summary(chain: DevChain, database_url: str, cli: Cli, say: Say) -> bool:
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
    say("    the EVM dev node keeps running with the stack: `meterproof stack down` stops it")
    return verify.returncode == 0 and checked.returncode == 0
