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
import requests
from bridge_harness import EPOCH_MS, T0, Clock, Fleet, make_fleet, query, settings_for
from fixtures.chain import Chain
from structlog.testing import capture_logs
from waiting import wait_until
from web3 import HTTPProvider, Web3
from web3.exceptions import TransactionNotFound, Web3RPCError
from web3.types import RPCEndpoint, RPCResponse

from meterproof.bridge.batches import BatchStore
from meterproof.bridge.evm import journal as evm_journal
from meterproof.bridge.evm import sink as evm_sink
from meterproof.bridge.evm.claims import ZERO_ADDRESS, Plan, plan
from meterproof.bridge.evm.client import NodeUnavailableError, node_call
from meterproof.bridge.evm.journal import Journal
from meterproof.bridge.evm.sink import EvmSink
from meterproof.bridge.mint import UNITS_PER_WH
from meterproof.bridge.oracle import Oracle
from meterproof.bridge.runner import Runner
from meterproof.bridge.telemetry import ANCHORS_LOST, SUBMISSIONS_FAILED
from meterproof.certs.layout import PkiLayout
from meterproof.schemas.timestamps import wall_ms
from meterproof.stack.process import free_port


def _sink(chain: Chain, database_url: str, w3: Web3 | None = None, **overrides: Any) -> EvmSink:
    """The evm sink on the test's contracts; `w3` another connection to the same node."""
    options: dict[str, Any] = {
        "confirmations": 1, "direct_max": 20, "stall_s": 60.0, "timeout_s": 2.0,
        "priority_fee_wei": 10**9, **overrides,
    }  # fmt: skip
    journal = Journal(database_url, timeout_s=2)
    return EvmSink(w3 or chain.w3, chain.deployment, oracle=chain.keys.oracle, journal=journal,
                   **options)  # fmt: skip


def _two_meters(
    database_url: str, make_meter_id: Callable[[], str], chain: Chain, b_wallet: str | None = None
) -> Fleet:
    """Meter a (Alice's EVM wallet) exports 60 Wh in epoch T0, meter b (no wallet, or
    `b_wallet` written into its row as SQL or COPY would) 6 Wh."""
    alice = f"eip155:1337:{chain.keys.alice.address}"
    fleet, (a, b) = make_fleet(database_url, make_meter_id, [alice, None])
    if b_wallet is not None:
        query(database_url, "UPDATE meters SET owner_wallet = %s WHERE meter_id = %s"
              " RETURNING meter_id", (b_wallet, b))  # fmt: skip
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
    """Meters a and b store their readings of epoch T0 (`_two_meters`, `b_wallet`), then an
    in-process bridge on the evm sink (options: the sink's) rechecking anchors every second,
    its clock just past the epoch; closed after the test."""
    made: list[Runner] = []

    def start(b_wallet: str | None = None, **sink_options: Any) -> Bridge:
        _two_meters(database_url, make_meter_id, chain, b_wallet)
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
# what the token or the node refuses: named, and never a batch wedged for good
# ---------------------------------------------------------------------------------------

ZERO_ACCOUNT = "eip155:1337:0x" + "00" * 20


def test_a_meter_whose_wallet_is_the_zero_address_waits_in_the_claim_tree(
    database_url: str, chain: Chain, start_bridge: Callable[..., Bridge]
) -> None:
    """Registration and wallet links refuse the zero address; a row written around them
    (SQL, COPY) must still not stop anchoring: GRID refuses to mint to it, so the meter's
    GRID waits in the claim tree, as a meter's without an EVM wallet does."""
    bridge = start_bridge(b_wallet=ZERO_ACCOUNT, timeout_s=0.5)
    bridge.runner.run_once()
    assert _status(database_url) == [(1, "anchored")]
    _assert_minted_once(chain)  # Alice's 60 Wh direct, meter b's 6 Wh in the claim tree


def test_a_mint_grid_refuses_is_a_named_permanent_failure(
    database_url: str,
    chain: Chain,
    start_bridge: Callable[..., Bridge],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should a batch's direct mints name an address GRID refuses anyway, anchor() reverts
    with GRID's own error: read as `invalid_entry` (an error line, its metric), the batch
    kept and retried slowly; not as a node outage, retried as if it could pass."""

    def to_zero(batch: int, mints: Any, *, direct_max: int) -> Plan:
        planned = plan(batch, mints, direct_max=direct_max)
        return Plan(batch, ((ZERO_ADDRESS, planned.direct_total),), planned.leaves)

    monkeypatch.setattr(evm_sink, "plan", to_zero)
    counted = SUBMISSIONS_FAILED.labels(code="invalid_entry")
    before = counted._value.get()
    bridge = start_bridge()
    with capture_logs() as logs:
        bridge.runner.run_once()
    ((status, error),) = query(database_url, "SELECT status, last_error FROM bridge_batches")
    assert status == "pending"
    assert error == (
        f"invalid_entry: anchor() reverts with GRID's ERC20InvalidReceiver({ZERO_ADDRESS}):"
        " the token refuses a mint of batch 1"
    )
    assert counted._value.get() == before + 1
    (line,) = [e for e in logs if e["event"] == "submission_failed"]
    assert (line["log_level"], line["code"]) == ("error", "invalid_entry")
    assert query(database_url, "SELECT count(*) FROM evm_transactions") == [(0,)]
    assert chain.anchor.functions.head().call() == 0


class _RefusesTheFirstTransaction(HTTPProvider):
    """The node refuses the first transaction it is sent, and every broadcast of the same
    bytes again, as underpriced (geth's answer below its price limit or with a full pool),
    and holds it nowhere; any other transaction it takes."""

    refused: Any = None

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        if method == "eth_sendRawTransaction":
            self.refused = self.refused or params[0]
            if params[0] == self.refused:
                error = {"code": -32000, "message": "transaction underpriced"}
                return {"jsonrpc": "2.0", "id": 1, "error": error}  # type: ignore[typeddict-item]
        return super().make_request(method, params)


def test_a_journalled_transaction_the_node_refuses_is_replaced_by_nonce(
    database_url: str, chain: Chain, start_bridge: Callable[..., Bridge]
) -> None:
    """Neither in the pool nor mined, and its bytes refused: broadcast again while younger
    than `stall_s`, then replaced at its nonce with higher fees (as a stalled one in the
    pool is), which the node takes: anchored, minted once."""
    provider = _RefusesTheFirstTransaction(chain.node.url, exception_retry_configuration=None)
    bridge = start_bridge(w3=Web3(provider), stall_s=0.5, timeout_s=0.2)
    runner, clock = bridge.runner, bridge.clock
    for _ in range(2):  # sent, then its bytes again: refused both times
        runner.run_once()
        ((status, error),) = query(database_url, "SELECT status, last_error FROM bridge_batches")
        assert status == "pending"
        assert error.startswith("unavailable: evm node: Web3RPCError"), error
        assert "transaction underpriced" in error
        assert query(database_url, "SELECT count(*) FROM evm_transactions") == [(1,)]
        clock.now += 1000
    time.sleep(0.6)  # the stall limit passes
    runner.run_once()
    assert _status(database_url) == [(1, "anchored")]
    sent = query(database_url, "SELECT nonce, max_fee_wei::bigint, priority_fee_wei::bigint,"
                 " tx_hash FROM evm_transactions ORDER BY sent_at")  # fmt: skip
    (nonce_1, fee_1, tip_1, _), (nonce_2, fee_2, tip_2, replacement) = sent
    assert nonce_1 == nonce_2
    assert fee_2 > fee_1 * 1.25
    assert tip_2 > tip_1 * 1.25
    assert _anchored_receipt(database_url)["reference"] == "0x" + bytes(replacement).hex()
    _assert_minted_once(chain)


class _NameStopsResolving(HTTPProvider):
    """The node's name stops resolving after the bridge's first calls: each broadcast
    fails as requests reports it (DNS, "Name or service not known"), not as the node's
    answer "already known"."""

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        if method == "eth_sendRawTransaction":
            raise requests.ConnectionError(
                "HTTPConnectionPool(host='rpc.example', port=8545): Max retries exceeded with"
                " url: / (Caused by NameResolutionError(\"Failed to resolve 'rpc.example'"
                ' ([Errno -2] Name or service not known)"))'
            )
        return super().make_request(method, params)


def test_a_broadcast_that_fails_in_dns_is_an_outage_not_an_answer(
    database_url: str, chain: Chain, start_bridge: Callable[..., Bridge]
) -> None:
    provider = _NameStopsResolving(chain.node.url, exception_retry_configuration=None)
    bridge = start_bridge(w3=Web3(provider), timeout_s=0.2)
    bridge.runner.run_once()
    ((status, error),) = query(database_url, "SELECT status, last_error FROM bridge_batches")
    assert status == "pending"
    assert error.startswith("unavailable: evm node: ConnectionError"), error
    assert "Name or service not known" in error


def _node_says(message: str) -> Web3RPCError:
    """A JSON-RPC error answer of the node, as web3.py raises it."""
    error: Any = {"code": -32000, "message": message}
    response: RPCResponse = {"jsonrpc": "2.0", "id": 1, "error": error}
    return Web3RPCError(str(error), rpc_response=response)


@pytest.mark.parametrize(
    ("cause", "known"),
    [
        (_node_says("already known"), True),  # geth and its forks
        (_node_says("known transaction: 0x5cc146f1d5575aa9"), True),  # geth before 1.9.25
        (_node_says("Transaction with the same hash was already imported."), True),
        (_node_says("AlreadyKnown"), True),  # Nethermind
        (_node_says("transaction underpriced"), False),
        (_node_says("replacement transaction underpriced"), False),
        (_node_says("nonce too low"), False),
        (_node_says("unknown account"), False),
        (_node_says("the sender is not known to this node"), False),
        (requests.ConnectionError("[Errno -2] Name or service not known"), False),
        (requests.ConnectionError("already known"), False),  # not the node's answer
    ],
)
def test_only_the_nodes_own_already_known_answer_counts_as_sent(
    cause: Exception, known: bool
) -> None:
    def broadcast() -> None:
        raise cause

    with pytest.raises(NodeUnavailableError) as caught:
        node_call(broadcast)
    assert evm_sink.already_known(caught.value) is known


def test_the_bridge_waits_while_chain_release_holds_the_oracles_nonce(
    database_url: str, chain: Chain, start_bridge: Callable[..., Bridge]
) -> None:
    """`chain release` holds the oracle account's nonce lock from its check to its mined
    transaction: the bridge journals and sends nothing meanwhile, then anchors."""
    bridge = start_bridge(timeout_s=0.5)
    key = evm_journal.nonce_lock_key(chain.deployment.chain_id, chain.keys.oracle.address)
    with psycopg.connect(database_url, autocommit=True) as release:
        release.execute("SELECT pg_advisory_lock(%s)", (key,))
        bridge.runner.run_once()
        ((status, error),) = query(database_url, "SELECT status, last_error FROM bridge_batches")
        assert (status, error) == ("pending", "unavailable: `chain release` is sending from the"
                                   " oracle account: anchoring waits for it")  # fmt: skip
        assert query(database_url, "SELECT count(*) FROM evm_transactions") == [(0,)]
        release.execute("SELECT pg_advisory_unlock(%s)", (key,))
    bridge.clock.now += 1000
    bridge.runner.run_once()
    assert _status(database_url) == [(1, "anchored")]
    _assert_minted_once(chain)


# ---------------------------------------------------------------------------------------
# kill -9 of the bridge process at each step of anchoring on chain
# ---------------------------------------------------------------------------------------


#: `python -c` that runs `meterproof` on a host whose clock is off by argv[1] seconds.
_SKEWED_HOST = """
import runpy, sys, time
skew_s = float(sys.argv.pop(1))
real, real_ns = time.time, time.time_ns
time.time = lambda: real() + skew_s
time.time_ns = lambda: real_ns() + round(skew_s * 1e9)
runpy.run_module("meterproof", run_name="__main__", alter_sys=True)
"""


def _bridge_process(
    database_url: str,
    pki: PkiLayout,
    chain: Chain,
    cwd: Path,
    *,
    crash_at: str | None,
    skew_s: float = 0,
    **settings: str,
) -> subprocess.Popen[bytes]:
    """`meterproof bridge` on the evm sink, 1-second epochs, with `settings` (METERPROOF_
    variables); its host's clock `skew_s` off."""
    contracts_file, key_file = cwd / "contracts.json", cwd / "oracle.key"
    chain.deployment.save(contracts_file)
    key_file.unlink(missing_ok=True)
    key_file.touch(mode=0o600)
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
        **settings,
    }
    if crash_at:
        env["METERPROOF_BRIDGE_CRASH_AT"] = crash_at
    python = [sys.executable, "-P", "-c", _SKEWED_HOST, str(skew_s)] if skew_s else [
        sys.executable, "-P", "-m", "meterproof"]  # fmt: skip
    argv = [*python, "bridge", "--epoch-seconds", "1"]
    return subprocess.Popen([*argv, "--seal-delay", "0.1", "--claim-interval", "0.1"], env=env)


#: A pass's failure, recorded once it is over: nothing before the crash set it.
_FIRST_ERROR = "SELECT last_error FROM bridge_batches WHERE batch = 1 AND last_error IS NOT NULL"


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
        if crash_at == "during_submit":  # the restarted bridge waits for it: no resend
            ((error,),) = wait_until(
                lambda: query(database_url, _FIRST_ERROR), what="a pass ended", within_s=30
            )
            ((journalled,),) = query(database_url, "SELECT tx_hash FROM evm_transactions")
            assert error == f"unavailable: transaction 0x{bytes(journalled).hex()} not mined yet"
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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("skew_s", "stall_s", "replaced"),
    [(3600, 60, False), (-3600, 1, True)],
    ids=["bridge-clock-an-hour-ahead", "bridge-clock-an-hour-behind"],
)
def test_the_stall_limit_is_measured_on_the_databases_clock(
    database_url: str,
    make_meter_id: Callable[[], str],
    pki: PkiLayout,
    chain: Chain,
    tmp_path: Path,
    skew_s: float,
    stall_s: float,
    replaced: bool,
) -> None:
    """The journal's `sent_at` is the database's clock; a bridge host an hour ahead of it
    must not take a transaction sent a second ago for an hour old (a replacement, with
    higher fees, on every pass), nor one an hour behind wait an hour to replace it."""
    alice = f"eip155:1337:{chain.keys.alice.address}"
    fleet, (a,) = make_fleet(database_url, make_meter_id, [alice])
    closed = (wall_ms() + round(min(skew_s, 0) * 1000)) // 1000 * 1000 - 3000  # on its clock
    fleet.store([(a, 1, closed + 1, 0, 100), (a, 2, closed + 500, 0, 160)])
    chain.node.rpc("miner_stop")  # the anchor waits in the pool
    proc = _bridge_process(
        database_url, pki, chain, tmp_path, crash_at=None, skew_s=skew_s,
        METERPROOF_EVM_STALL_S=str(stall_s), METERPROOF_SINK_TIMEOUT_S="0.3",
    )  # fmt: skip
    count = "SELECT count(*) FROM evm_transactions"
    try:
        wait_until(lambda: query(database_url, count)[0][0] >= 1, what="sent", within_s=30)
        if replaced:  # a pass every ~0.5 s: replaced after the 1 s stall limit
            wait_until(lambda: query(database_url, count)[0][0] >= 2, what="replaced",
                       within_s=10)  # fmt: skip
        else:  # several passes, all well within the 60 s stall limit
            attempts = "SELECT attempts FROM bridge_batches WHERE batch = 1"
            wait_until(lambda: query(database_url, attempts)[0][0] >= 4, what="three passes",
                       within_s=30)  # fmt: skip
            assert query(database_url, count) == [(1,)]
        chain.node.rpc("miner_start")
        chain.node.rpc("evm_mine")
        wait_until(lambda: _unanchored(database_url) == 0, what="anchored", within_s=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert chain.grid.functions.balanceOf(chain.keys.alice.address).call() == 60 * UNITS_PER_WH
