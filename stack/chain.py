"""A local EVM dev node (ganache, from the checkout's node_modules) on loopback, and the
GRID contracts on it for `stack chain` and `demo --sink evm`.

It answers JSON-RPC exactly as a public EVM node would, so the `evm` ledger sink is tested
and demonstrated against a real chain: blocks, receipts, reverts, a mempool whose mining
can be stopped, snapshots to revert (a reorg), and a database that survives a restart.
The accounts given at start are funded; nothing else is.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from eth_account.signers.local import LocalAccount
from web3 import Web3

from meterproof.bridge.evm.client import Deployment, connect, load_key, new_key, node_call
from meterproof.bridge.evm.deploy import deploy
from meterproof.stack.process import (
    LOOPBACK,
    SpawnedServer,
    StackError,
    check_ports_free,
    executable,
    free_port,
)

NODE_MODULES: Final = Path(__file__).resolve().parents[1] / "node_modules"
CHAIN_ID: Final = 1337
#: 10**24 wei each: enough ether for any test or benchmark run.
FUNDING_WEI: Final = 10**24


class ChainNode(SpawnedServer):
    """ganache whose pid file, log and chain database live in `directory`.

    `funded` are 0x private keys given ether at genesis (a restart keeps the database,
    so the same keys must be passed again); `block_time_s` > 0 mines on an interval, as a
    public chain does, instead of one block per transaction."""

    name = "ganache"
    program = "node"

    def __init__(
        self,
        *,
        directory: Path,
        funded: Sequence[str],
        port: int | None = None,
        block_time_s: float = 0,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(
            log=directory / "ganache.log", pid_file=directory / "ganache.pid", timeout=timeout
        )
        self.directory = directory
        self.funded = list(funded)
        self.port = port or free_port()
        self.block_time_s = block_time_s  #: 0: a block per transaction (instamine)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> float:
        if self.is_running():
            return 0.0
        cli = NODE_MODULES / "ganache" / "dist" / "node" / "cli.js"
        if not cli.is_file():
            raise StackError(f"ganache is not installed in {NODE_MODULES}: run `make setup`")
        check_ports_free(self.port)
        (self.directory / "chain").mkdir(parents=True, exist_ok=True)
        argv = [executable("node"), str(cli), "--server.host", LOOPBACK]
        argv += ["--server.port", str(self.port), "--chain.chainId", str(CHAIN_ID)]
        argv += ["--database.dbPath", str(self.directory / "chain"), "--logging.quiet"]
        argv += ["--miner.blockTime", f"{self.block_time_s:g}"]
        for key in self.funded:
            argv += ["--wallet.accounts", f"{key},{FUNDING_WEI}"]
        return self._launch(argv, ready=self._answers, what=f"ganache on port {self.port}")

    def rpc(self, method: str, *params: Any) -> Any:  # noqa: ANN401 - JSON-RPC results vary
        """One JSON-RPC call (the dev-node methods web3.py does not wrap: evm_snapshot,
        evm_revert, evm_mine, miner_stop, miner_start)."""
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        request = urllib.request.Request(  # noqa: S310 - our own http://127.0.0.1 URL
            self.url, body.encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
            reply = json.loads(answer.read())
        if "error" in reply:
            raise StackError(f"ganache {method}: {reply['error'].get('message')}")
        return reply["result"]

    def _answers(self) -> bool:
        try:
            return int(self.rpc("eth_chainId"), 16) == CHAIN_ID
        except (OSError, urllib.error.URLError, ValueError):
            return False


@dataclass(frozen=True, slots=True)
class DevChain:
    node: ChainNode
    deployment: Deployment
    environ: dict[str, str]  #: the bridge's settings for this chain (also in `env_file`)
    env_file: Path


def _key(path: Path) -> LocalAccount:
    return load_key(path) if path.exists() else new_key(path)


def start_dev_chain(
    run_dir: Path, *, port: int = 8545, block_time_s: float = 1, confirmations: int = 2
) -> DevChain:
    """The node of RUN_DIR/chain with the admin and oracle accounts of RUN_DIR/evm funded
    at genesis (created when missing), GridAnchor deployed once and reused while the node
    holds it, and RUN_DIR/evm/chain.env with the settings that point the bridge at it."""
    folder = run_dir.absolute() / "evm"
    admin, oracle = _key(folder / "admin.key"), _key(folder / "oracle.key")
    funded = ["0x" + bytes(a.key).hex() for a in (admin, oracle)]
    node = ChainNode(
        directory=run_dir.absolute() / "chain", funded=funded, port=port, block_time_s=block_time_s
    )
    node.start()
    w3 = connect(node.url, timeout_s=30)
    contracts_file = folder / "contracts.json"
    deployment = Deployment.load(contracts_file) if contracts_file.exists() else None
    if deployment is None or not _has_code(w3, deployment.anchor):
        deployment = deploy(w3, admin, oracle.address)
        deployment.save(contracts_file)
    environ = {
        "METERPROOF_SINK": "evm",
        "METERPROOF_EVM_RPC_URL": node.url,
        "METERPROOF_EVM_CHAIN_ID": str(deployment.chain_id),
        "METERPROOF_EVM_CONTRACTS_FILE": str(contracts_file),
        "METERPROOF_EVM_ORACLE_KEY_FILE": str(folder / "oracle.key"),
        "METERPROOF_EVM_CONFIRMATIONS": str(confirmations),
    }
    env_file = folder / "chain.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in environ.items()))
    return DevChain(node, deployment, environ, env_file)


def _has_code(w3: Web3, address: str) -> bool:
    return bool(node_call(lambda: w3.eth.get_code(Web3.to_checksum_address(address))))


def stop_dev_chain(run_dir: Path) -> bool:
    """Stop the node of RUN_DIR/chain if it runs (its chain is kept); True if it did."""
    node = ChainNode(directory=run_dir.absolute() / "chain", funded=[])
    if not node.is_running():
        return False
    node.stop()
    return True
