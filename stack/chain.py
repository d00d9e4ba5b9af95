"""A local EVM dev node (ganache, from the checkout's node_modules) on loopback.

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
from pathlib import Path
from typing import Any, Final

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
