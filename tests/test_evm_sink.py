"""The bridge anchoring on a real dev node through the `evm` sink: N confirmations, a
transaction that never mines (replaced by nonce), a reorg that drops an anchor, a node
restart, and kill -9 of the bridge process at each step; every batch anchored exactly
once on chain and no GRID minted twice."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from bridge_harness import EPOCH_MS, T0, Clock, Fleet, make_fleet, query, settings_for
from fixtures.chain import Chain
from waiting import wait_until
from web3.exceptions import TransactionNotFound

from meterproof.bridge.batches import BatchStore
from meterproof.bridge.evm.journal import Journal
from meterproof.bridge.evm.sink import EvmSink
from meterproof.bridge.mint import UNITS_PER_WH
from meterproof.bridge.oracle import Oracle
from meterproof.bridge.runner import Runner
from meterproof.bridge.telemetry import ANCHORS_LOST
from meterproof.certs.layout import PkiLayout
from meterproof.schemas.timestamps import wall_ms
from meterproof.stack.process import free_port


def _sink(chain: Chain, database_url: str, **overrides: Any) -> EvmSink:
    options: dict[str, Any] = {
        "confirmations": 1, "direct_max": 20, "stall_s": 60.0, "timeout_s": 2.0,
        "priority_fee_wei": 10**9, **overrides,
    }  # fmt: skip
    journal = Journal(database_url, timeout_s=2)
    return EvmSink(chain.w3, chain.deployment, oracle=chain.keys.oracle, journal=journal, **options)


def _two_meters(database_url: str, make_meter_id: Callable[[], str], chain: Chain) -> Fleet:
    """Meter a (Alice's EVM wallet) exports 60 Wh in epoch T0, meter b (no wallet) 6 Wh."""
    alice = f"eip155:1337:{chain.keys.alice.address}"
    fleet, (a, b) = make_fleet(database_url, make_meter_id, [alice, None])
    fleet.store([(a, 1, T0 + 1, 0, 100), (a, 2, T0 + 500, 0, 160),
                 (b, 1, T0 + 2, 0, 3), (b, 2, T0 + 600, 0, 9)])  # fmt: skip
    return fleet


@dataclass
class Bridge:
    runner: Runner
    clock: Clock
    sink: EvmSink


@pytest.fixture
def start_bridge(
    database_url: str, make_meter_id: Callable[[], str], chain: Chain, ed25519_oracle: Oracle
) -> Iterator[Callable[..., Bridge]]:
    """Meters a and b store their readings of epoch T0 (`_two_meters`), then an in-process
    bridge on the evm sink (options: the sink's) rechecking anchors every second, its
    clock just past the epoch; closed after the test."""
    made: list[Runner] = []

    def start(**sink_options: Any) -> Bridge:
        _two_meters(database_url, make_meter_id, chain)
        clock = Clock(T0 + EPOCH_MS + 1)
        sink = _sink(chain, database_url, **sink_options)
        settings = settings_for(database_url, sink="evm", recheck_interval_s=1)
        runner = Runner(settings, sink=sink, oracle=ed25519_oracle, publisher=None,
                        clock=clock, jitter=lambda: 0)  # fmt: skip
        made.append(runner)
        return Bridge(runner, clock, sink)

    yield start
    for runner in made:
        runner.close()


def _status(database_url: str) -> list[tuple[Any, ...]]:
    return query(database_url, "SELECT batch, status FROM bridge_batches ORDER BY batch")


def _events(chain: Chain) -> list[tuple[int, str]]:
    """(batch, transaction hash) of every Anchored event on the canonical chain."""
    logs = chain.anchor.events.Anchored.get_logs(from_block=chain.deployment.block)
    return [(int(e["args"]["batch"]), e["transactionHash"].to_0x_hex()) for e in logs]


def _assert_minted_once(chain: Chain) -> None:
    """Alice's 60 Wh minted directly once; meter b's 6 Wh committed to the claim tree."""
    alice = chain.grid.functions.balanceOf(chain.keys.alice.address).call()
    assert alice == 60 * UNITS_PER_WH
    assert chain.grid.functions.totalSupply().call() == 60 * UNITS_PER_WH
    stored = chain.anchor.functions.batches(1).call()
    assert (stored[5], stored[6], stored[8]) == (1, 6 * UNITS_PER_WH, 60 * UNITS_PER_WH)


def _anchored_receipt(database_url: str) -> dict[str, Any]:
    ((receipt,),) = query(database_url, "SELECT receipt FROM bridge_batches WHERE batch = 1")
    return dict(receipt)


@pytest.mark.slow
def test_a_batch_counts_as_anchored_only_n_blocks_deep(
    database_url: str, chain: Chain, start_bridge: Callable[..., Bridge]
) -> None:
    bridge = start_bridge(confirmations=3, timeout_s=0.2)
    runner, clock = bridge.runner, bridge.clock
    runner.run_once()
    assert _status(database_url) == [(1, "pending")]
    ((_, tx_hash),) = _events(chain)  # sent and mined: 1 block deep
    for depth, status in ((2, "pending"), (3, "anchored")):
        chain.node.rpc("evm_mine")
        clock.now += 1000
        runner.run_once()
        assert _status(database_url) == [(1, status)], depth
    receipt = _anchored_receipt(database_url)
    assert (receipt["sink"], receipt["reference"]) == ("evm", tx_hash)
    assert query(database_url, "SELECT count(*) FROM evm_transactions") == [(1,)]
    _assert_minted_once(chain)


@pytest.mark.slow
def test_a_transaction_that_never_mines_is_replaced_by_nonce(
    database_url: str, chain: Chain, start_bridge: Callable[..., Bridge]
) -> None:
    bridge = start_bridge(stall_s=0.5, timeout_s=0.2)
    runner, clock = bridge.runner, bridge.clock
    chain.node.rpc("miner_stop")
    runner.run_once()
    time.sleep(0.6)  # the stall limit passes
    clock.now += 1000
    runner.run_once()
    sent = query(database_url, "SELECT tx_hash, nonce, max_fee_wei::bigint,"
                 " priority_fee_wei::bigint FROM evm_transactions ORDER BY sent_at")  # fmt: skip
    assert len(sent) == 2
    (first, nonce_1, fee_1, tip_1), (second, nonce_2, fee_2, tip_2) = sent
    assert nonce_1 == nonce_2
    assert fee_2 > fee_1 * 1.1
    assert tip_2 > tip_1 * 1.1
    assert _status(database_url) == [(1, "pending")]
    chain.node.rpc("miner_start")
    chain.node.rpc("evm_mine")  # instamine mode mines new transactions, not waiting ones
    wait_until(lambda: chain.anchor.functions.head().call() == 1, what="mined", within_s=10)
    clock.now += 1000
    runner.run_once()
    assert _status(database_url) == [(1, "anchored")]
    # ganache 7.9 sometimes keeps both same-nonce transactions of a stopped miner and mines
    # both (a real node keeps the higher-fee one): then one anchors and the other reverts.
    statuses = {}
    for tx in (first, second):
        with contextlib.suppress(TransactionNotFound):
            receipt = chain.w3.eth.get_transaction_receipt(bytes(tx))
            statuses[receipt["transactionHash"].to_0x_hex()] = receipt["status"]
    assert statuses.pop(_anchored_receipt(database_url)["reference"]) == 1
    assert set(statuses.values()) <= {0}
    _assert_minted_once(chain)


@pytest.mark.slow
def test_a_reorg_that_drops_the_anchor_is_noticed_and_anchored_again(
    database_url: str, chain: Chain, start_bridge: Callable[..., Bridge]
) -> None:
    bridge = start_bridge()
    runner, clock = bridge.runner, bridge.clock
    snapshot = chain.node.rpc("evm_snapshot")
    runner.run_once()
    assert _status(database_url) == [(1, "anchored")]
    chain.node.rpc("evm_revert", snapshot)  # the blocks holding the anchor are gone
    assert _events(chain) == []
    lost = ANCHORS_LOST._value.get()
    clock.now += 2000  # past recheck_interval_s
    runner.run_once()
    assert ANCHORS_LOST._value.get() == lost + 1
    assert _status(database_url) == [(1, "anchored")]
    (((_, tx_hash),)) = _events(chain)
    assert _anchored_receipt(database_url)["reference"] == tx_hash
    _assert_minted_once(chain)


@pytest.mark.slow
def test_a_node_restart_delays_anchoring_and_loses_nothing(
    database_url: str, chain: Chain, start_bridge: Callable[..., Bridge]
) -> None:
    bridge = start_bridge()
    runner, clock = bridge.runner, bridge.clock
    chain.node.kill()
    runner.run_once()
    ((status, error),) = query(database_url, "SELECT status, last_error FROM bridge_batches")
    assert status == "pending"
    assert error.startswith("unavailable: evm node")
    chain.node.start()
    clock.now += 1000
    runner.run_once()
    assert _status(database_url) == [(1, "anchored")]
    assert len(_events(chain)) == 1
    _assert_minted_once(chain)


def test_submitting_an_anchored_batch_again_returns_its_receipt_and_sends_nothing(
    database_url: str, chain: Chain, start_bridge: Callable[..., Bridge]
) -> None:
    bridge = start_bridge()
    bridge.runner.run_once()
    sink = bridge.sink
    with psycopg.connect(database_url, autocommit=True) as conn:
        entry = BatchStore(conn).latest_anchored()
    assert entry is not None
    again = sink.submit(entry.entry, entry.entry.header.idempotency_key)
    assert again == entry.receipt
    assert query(database_url, "SELECT count(*) FROM evm_transactions") == [(1,)]
    assert len(_events(chain)) == 1


# ---------------------------------------------------------------------------------------
# kill -9 of the bridge process at each step of anchoring on chain
# ---------------------------------------------------------------------------------------


def _bridge_process(
    database_url: str, pki: PkiLayout, chain: Chain, cwd: Path, *, crash_at: str | None
) -> subprocess.Popen[bytes]:
    contracts_file, key_file = cwd / "contracts.json", cwd / "oracle.key"
    chain.deployment.save(contracts_file)
    key_file.write_text(chain.keys.oracle.key.to_0x_hex())
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("METERPROOF_")},
        "METERPROOF_DATABASE_URL": database_url,
        "METERPROOF_PKI_ROOT": str(pki.root),
        "METERPROOF_MQTT_PORT": str(free_port()),
        "METERPROOF_METRICS_PORT": "0",
        "METERPROOF_LOG_LEVEL": "WARNING",
        "METERPROOF_RETRY_INITIAL_S": "0.05",
        "METERPROOF_RETRY_MAX_S": "0.2",
        "METERPROOF_SINK": "evm",
        "METERPROOF_EVM_RPC_URL": chain.node.url,
        "METERPROOF_EVM_CONTRACTS_FILE": str(contracts_file),
        "METERPROOF_EVM_ORACLE_KEY_FILE": str(key_file),
        "METERPROOF_EVM_CONFIRMATIONS": "1",
    }
    if crash_at:
        env["METERPROOF_BRIDGE_CRASH_AT"] = crash_at
    argv = [sys.executable, "-P", "-m", "meterproof", "bridge", "--epoch-seconds", "1"]
    return subprocess.Popen([*argv, "--seal-delay", "0.1", "--claim-interval", "0.1"], env=env)


def _unanchored(database_url: str) -> int:
    ((n,),) = query(
        database_url,
        "SELECT count(*) FROM reading_log l LEFT JOIN bridge_batches b"
        " ON b.batch = l.batch_id WHERE b.status IS DISTINCT FROM 'anchored'",
    )
    return int(n)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("crash_at", "sent_at_crash", "mined_at_crash"),
    [("before_submit", 0, 0), ("during_submit", 1, 0), ("after_submit", 1, 1)],
)
def test_kill_9_at_each_step_then_restart_anchors_every_batch_once_on_chain(
    database_url: str,
    make_meter_id: Callable[[], str],
    pki: PkiLayout,
    chain: Chain,
    tmp_path: Path,
    crash_at: str,
    sent_at_crash: int,
    mined_at_crash: int,
) -> None:
    alice = f"eip155:1337:{chain.keys.alice.address}"
    fleet, (a, b) = make_fleet(database_url, make_meter_id, [alice, None])
    closed = wall_ms() // 1000 * 1000 - 3000  # an epoch that closed 2 s ago
    fleet.store([(a, 1, closed + 1, 5, 100), (a, 2, closed + 500, 6, 160), (b, 1, closed, 0, 3)])
    if crash_at == "during_submit":
        chain.node.rpc("miner_stop")  # sent, and not mined when the bridge dies
    proc = _bridge_process(database_url, pki, chain, tmp_path, crash_at=crash_at)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert query(database_url, "SELECT status, attempts FROM bridge_batches") == [("pending", 1)]
    sent = query(database_url, "SELECT count(*) FROM evm_transactions")
    assert sent == [(sent_at_crash,)]
    assert chain.anchor.functions.head().call() == mined_at_crash

    now = wall_ms()  # more readings, one of them late (in the crashed batch's epoch)
    fleet.store([(a, 3, now, 7, 190), (b, 2, closed + 700, 1, 4), (b, 3, now + 50, 2, 9)])
    proc = _bridge_process(database_url, pki, chain, tmp_path, crash_at=None)
    try:
        if crash_at == "during_submit":
            time.sleep(1.5)  # the restarted bridge finds its transaction waiting: no resend
            assert query(database_url, "SELECT count(*) FROM evm_transactions") == [(1,)]
            chain.node.rpc("miner_start")
            chain.node.rpc("evm_mine")
        wait_until(lambda: _unanchored(database_url) == 0, what="all anchored", within_s=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    batches = query(database_url, "SELECT batch, entry_hash FROM bridge_batches ORDER BY batch")
    assert chain.anchor.functions.head().call() == len(batches)
    for batch, entry_hash in batches:
        assert bytes(chain.anchor.functions.batches(batch).call()[0]) == bytes(entry_hash)
    ((units,),) = query(
        database_url, "SELECT sum(grid_units) FROM bridge_mints WHERE meter_id = %s", (a,)
    )
    assert int(units) == 90 * UNITS_PER_WH  # 190 - 100 Wh, minted once
    assert chain.grid.functions.balanceOf(chain.keys.alice.address).call() == int(units)
    assert chain.grid.functions.totalSupply().call() == int(units)  # b's GRID waits in claims
    receipts = [json.dumps(r) for (r,) in query(database_url, "SELECT receipt FROM bridge_batches")]
    assert all('"sink": "evm"' in r for r in receipts)
