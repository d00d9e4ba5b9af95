"""Benchmark: GRID on an EVM dev node (ganache). Gas and seconds per epoch for 1,000,
100,000 and 1,000,000 meters, minted directly against committed as a claim tree, and the
anchor latency from an epoch's close to N confirmations through the real `evm` sink.

Measured, not modelled: the anchoring transactions at every size (the claim tree is built
over all n leaves and anchored), direct mints of up to `direct_max` wallets in one
transaction, and a sample of real claims from each tree. Extrapolated, and labelled so in
the report: the per-epoch total of claims (n x the sampled mean) and of direct minting at
sizes one transaction cannot hold (base + n x the measured cost per wallet).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import psycopg
from eth_account import Account
from web3 import Web3

from meterproof.bench.bridge import EPOCH_MS, _chunks, _write
from meterproof.bridge.batches import BatchStore
from meterproof.bridge.entry import GENESIS, Entry, seal
from meterproof.bridge.epochs import containing
from meterproof.bridge.evm.claims import Leaf, plan
from meterproof.bridge.evm.client import Deployment, connect, contracts
from meterproof.bridge.evm.deploy import deploy
from meterproof.bridge.evm.journal import Journal
from meterproof.bridge.evm.sink import EvmSink
from meterproof.bridge.ledger.sink import SinkPendingError
from meterproof.bridge.mint import UNITS_PER_WH, Mint
from meterproof.bridge.oracle import Oracle
from meterproof.db.migrate import migrate
from meterproof.schemas.merkle import _next_level, leaf_hash, merkle_root
from meterproof.schemas.signatures import Ed25519Public, generate_private_key
from meterproof.schemas.timestamps import wall_ms
from meterproof.stack.chain import ChainNode
from meterproof.stack.postgres import PostgresServer

SIZES: Final = (1_000, 100_000, 1_000_000)
#: ganache's default block gas limit, as on Ethereum mainnet and Energy Web Chain's order.
BLOCK_GAS_LIMIT: Final = 30_000_000
Progress = Callable[[str], None]


class _Bench:
    def __init__(self, node: ChainNode, admin: Any, oracle: Any) -> None:  # noqa: ANN401
        self.w3 = connect(node.url, timeout_s=120)
        self.admin, self.oracle = admin, oracle
        self.deployment: Deployment = deploy(self.w3, admin, oracle.address)
        self.anchor, self.grid = contracts(self.w3, self.deployment)
        key = generate_private_key("EdDSA")
        public = key.public_key()
        assert isinstance(public, Ed25519Public)
        self.signer = Oracle(key, public.raw)
        self.prev, self.batch = GENESIS, 0

    def send(self, account: Any, call: Any) -> tuple[int, float]:  # noqa: ANN401
        """(gas used, seconds from signing to the mined receipt)."""
        began = time.perf_counter()
        tx = call.build_transaction(
            {"from": account.address, "chainId": self.deployment.chain_id,
             "gas": BLOCK_GAS_LIMIT // 2,
             "nonce": self.w3.eth.get_transaction_count(account.address)}
        )  # fmt: skip
        tx_hash = self.w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=300)
        if receipt["status"] != 1:
            raise AssertionError(f"benchmark transaction {tx_hash.to_0x_hex()} reverted")
        return int(receipt["gasUsed"]), time.perf_counter() - began

    def entry(self, mints: Sequence[Mint]) -> Entry:
        self.batch += 1
        readings = [hashlib.sha256(f"r{self.batch}-{i}".encode()).digest() for i in range(4)]
        entry = seal(
            batch=self.batch, epoch=self.batch, epoch_ms=EPOCH_MS, prev_hash=self.prev,
            merkle_root=merkle_root(readings), reading_count=4, mints=mints,
            oracle=self.signer.key, oracle_key=self.signer.public_key,
        )  # fmt: skip
        self.prev = entry.header.entry_hash
        return entry

    def anchor_call(self, entry: Entry, root: bytes, leaves: int, total: int, direct: Any) -> Any:  # noqa: ANN401
        return self.anchor.functions.anchor(
            entry.header.encode(), entry.signature, (root, leaves, total),
            [a for a, _ in direct], [u for _, u in direct],
        )  # fmt: skip


def _address(i: int, salt: str) -> str:
    """A wallet no other measurement has minted to: a first balance costs more gas."""
    digest = hashlib.sha256(f"{salt}-{i}".encode()).digest()
    return Web3.to_checksum_address("0x" + digest[:20].hex())


def _direct(bench: _Bench, sizes: Sequence[int], progress: Progress) -> dict[str, Any]:
    measured = []
    for k in sizes:
        mints = [
            Mint(f"m-{i:07d}", f"eip155:1337:{_address(i, f'direct{k}')}", 1000 + i, 0)
            for i in range(k)
        ]
        entry = bench.entry(mints)
        p = plan(entry.header.batch, entry.mints, direct_max=k)
        gas, seconds = bench.send(bench.oracle, bench.anchor_call(entry, bytes(32), 0, 0, p.direct))
        measured.append({"wallets": k, "gas": gas, "seconds": seconds})
        progress(f"   direct: {k} wallets in one anchor transaction, {gas:,} gas")
    # From the two largest: the first anchor also pays GRID's first totalSupply write.
    before, last = measured[-2], measured[-1]
    per_wallet = (last["gas"] - before["gas"]) / (last["wallets"] - before["wallets"])
    return {"measured": measured, "per_wallet_gas": per_wallet,
            "base_gas": last["gas"] - per_wallet * last["wallets"]}  # fmt: skip


def _paths(datas: list[bytes], indices: Sequence[int]) -> tuple[bytes, dict[int, list[bytes]]]:
    """The root and the audit paths of `indices`, from one pass over the levels."""
    level = [leaf_hash(d) for d in datas]
    paths: dict[int, list[bytes]] = {i: [] for i in indices}
    where = {i: i for i in indices}
    while len(level) > 1:
        for i, at in where.items():
            if at ^ 1 < len(level):
                paths[i].append(level[at ^ 1])
            where[i] = at // 2
        level = _next_level(level)
    return level[0], paths


def _tree(bench: _Bench, n: int, claims: int, progress: Progress) -> dict[str, Any]:
    entry = bench.entry([])
    batch = entry.header.batch
    accounts = [_address(i, f"tree{n}").lower() for i in range(n)]  # the input, not timed
    began = time.perf_counter()
    leaves = [
        Leaf(f"m-{i:07d}", account, (1 + i % 5000) * UNITS_PER_WH)
        for i, account in enumerate(accounts)
    ]
    start = (n * 7) // 13 // 256 * 256  # a bitmap word's start: its first claim pays for it
    sample = list(range(start, min(n, start + claims)))
    root, paths = _paths([leaf.data(batch) for leaf in leaves], sample)
    build_s = time.perf_counter() - began
    total = sum(leaf.units for leaf in leaves)
    gas, anchor_s = bench.send(bench.oracle, bench.anchor_call(entry, root, n, total, ()))
    claim_gas: list[int] = []
    began = time.perf_counter()
    for i in sample:
        leaf = leaves[i]
        call = bench.anchor.functions.claim(
            batch, i, Web3.to_checksum_address(leaf.account), leaf.units, leaf.meter_id, paths[i]
        )
        claim_gas.append(bench.send(bench.admin, call)[0])
    claim_s = (time.perf_counter() - began) / len(sample)
    mean = sum(claim_gas) / len(claim_gas)
    progress(f"   tree: {n:,} leaves, anchor {gas:,} gas, claim mean {mean:,.0f} gas")
    return {
        "meters": n, "tree_build_s": build_s, "anchor_gas": gas, "anchor_s": anchor_s,
        "claims_sampled": len(claim_gas), "claim_gas_min": min(claim_gas),
        "claim_gas_max": max(claim_gas), "claim_gas_mean": mean, "claim_s_mean": claim_s,
        "proof_hashes": len(paths[sample[0]]),
        "claims_gas_per_epoch_extrapolated": mean * n,
    }  # fmt: skip


def _latency(run_dir: Path, node: ChainNode, admin: Any, oracle: Any, *,  # noqa: ANN401
             meters: int, confirmations: int) -> dict[str, Any]:  # fmt: skip
    """Epoch close -> N confirmations through BatchStore and EvmSink, on 1-second blocks."""
    server = PostgresServer(directory=run_dir / "pg")
    server.start()
    try:
        migrate(server.url)
        w3 = connect(node.url, timeout_s=30)
        deployment = deploy(w3, admin, oracle.address)
        key = generate_private_key("EdDSA")
        public = key.public_key()
        assert isinstance(public, Ed25519Public)
        signer = Oracle(key, public.raw)
        epoch = containing(wall_ms() - 86_400_000, EPOCH_MS)
        with psycopg.connect(server.url, autocommit=True) as conn:
            with (
                conn.cursor() as cur,
                cur.copy("COPY meters (meter_id, status, owner_wallet) FROM STDIN") as copy,
            ):
                for m in range(meters):
                    copy.write_row(
                        (f"bench-{m:07d}", "active", f"eip155:1337:{_address(m % 100, 'latency')}")
                    )
            for rows in _chunks(epoch, meters * 2, meters, 50_000):
                _write(conn, rows)
            store = BatchStore(conn)
            sink = EvmSink(
                w3, deployment, oracle=oracle, journal=Journal(server.url, timeout_s=30),
                confirmations=confirmations, direct_max=20, stall_s=60, timeout_s=30,
                priority_fee_wei=10**9,
            )  # fmt: skip
            began = time.perf_counter()
            store.advance(epoch.end_ms, epoch_ms=EPOCH_MS, delay_ms=0, oracle=signer)
            seal_s = time.perf_counter() - began
            pending = store.first_pending()
            assert pending is not None
            key_ = pending.entry.header.idempotency_key
            while True:
                try:
                    receipt = (
                        sink.submit(pending.entry, key_)
                        if pending.attempts == 0
                        else sink.fetch(key_)
                    )
                except SinkPendingError:
                    pending = store.first_pending() or pending
                    time.sleep(0.05)
                    continue
                if receipt is not None:
                    break
            latency_s = time.perf_counter() - began
            store.mark_anchored(pending.batch, receipt)
    finally:
        server.stop()
    return {"meters": meters, "readings": meters * 2, "confirmations": confirmations,
            "block_time_s": node.block_time_s, "seal_s": seal_s, "close_to_confirmed_s": latency_s,
            "anchor_block": receipt.position}  # fmt: skip


def run_chain(run_dir: Path, *, sizes: Sequence[int] = SIZES, claims: int = 32,
              direct_sizes: Sequence[int] = (1, 20, 100), latency_meters: int = 1_000,
              confirmations: int = 2, progress: Progress) -> dict[str, Any]:  # fmt: skip
    admin, oracle = Account.create(), Account.create()
    funded = [admin.key.to_0x_hex(), oracle.key.to_0x_hex()]
    node = ChainNode(directory=run_dir / "ganache", funded=funded)
    node.start()
    try:
        bench = _Bench(node, admin, oracle)
        direct = _direct(bench, direct_sizes, progress)
        trees = [_tree(bench, n, claims, progress) for n in sizes]
    finally:
        node.stop()
    for tree in trees:
        n = tree["meters"]
        gas = direct["base_gas"] + direct["per_wallet_gas"] * n
        tree["direct_gas_per_epoch_extrapolated"] = gas
        tree["direct_blocks_needed"] = math.ceil(gas / BLOCK_GAS_LIMIT)
    progress(f"== chain latency: {latency_meters:,} meters, 1-second blocks, N={confirmations}")
    timed = ChainNode(directory=run_dir / "ganache-timed", funded=funded, block_time_s=1)
    timed.start()
    try:
        latency = _latency(
            run_dir, timed, admin, oracle, meters=latency_meters, confirmations=confirmations
        )
    finally:
        timed.stop()
    progress(
        f"   epoch close -> {confirmations} confirmations: {latency['close_to_confirmed_s']:.2f} s"
    )
    return {"direct": direct, "trees": trees, "latency": latency,
            "block_gas_limit": BLOCK_GAS_LIMIT}  # fmt: skip
