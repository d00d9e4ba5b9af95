"""`ledger verify` and `ledger proof` with the `evm` sink: the readings against the
bridge's record, the record against the chain (anchors, claim trees, GRID per wallet,
total supply), and a reading's proof accepted by the contract's view."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from bridge_harness import EPOCH_MS, T0, Clock, make_fleet, query, settings_for
from fixtures.chain import Chain, sealed_entry

from meterproof.bridge.evm.audit import ChainReport, audit_chain
from meterproof.bridge.evm.claims import plan
from meterproof.bridge.evm.journal import Journal
from meterproof.bridge.evm.release import release_linked
from meterproof.bridge.evm.sink import EvmSink
from meterproof.bridge.mint import UNITS_PER_WH, Mint
from meterproof.bridge.oracle import Oracle
from meterproof.bridge.proof import build_proof
from meterproof.bridge.runner import Runner
from meterproof.bridge.verify import BRIDGE_RECORD, Report, verify
from meterproof.schemas.signatures import generate_private_key


@pytest.fixture
def anchored(
    database_url: str, make_meter_id: Callable[[], str], chain: Chain, ed25519_oracle: Oracle
) -> dict[str, str]:
    """Two batches on chain: the first with two wallets (more than direct_max 1, so all in
    its claim tree), the second with one (minted directly); meter c has no EVM wallet."""
    keys = chain.keys
    wallets = [f"eip155:1337:{keys.alice.address}", f"eip155:1337:{keys.bob.address}", None]
    fleet, (a, b, c) = make_fleet(database_url, make_meter_id, wallets)
    fleet.store([(a, 1, T0 + 1, 0, 100), (a, 2, T0 + 500, 0, 130), (b, 1, T0 + 2, 0, 10),
                 (b, 2, T0 + 900, 0, 30), (c, 1, T0 + 3, 0, 5),
                 (c, 2, T0 + 800, 0, 12)])  # fmt: skip
    sink = EvmSink(
        chain.w3, chain.deployment, oracle=keys.oracle, journal=Journal(database_url, timeout_s=2),
        confirmations=1, direct_max=1, stall_s=60, timeout_s=2, priority_fee_wei=10**9,
    )  # fmt: skip
    clock = Clock(T0 + EPOCH_MS + 1)
    runner = Runner(settings_for(database_url, sink="evm"), sink=sink, oracle=ed25519_oracle,
                    publisher=None, clock=clock, jitter=lambda: 0)  # fmt: skip
    runner.run_once()
    fleet.store([(a, 3, T0 + EPOCH_MS + 10, 0, 150)])
    clock.now += EPOCH_MS
    runner.run_once()
    runner.close()
    assert query(database_url, "SELECT status FROM bridge_batches") == [("anchored",)] * 2
    return {"a": a, "b": b, "c": c}


def _verify(database_url: str, oracle: Oracle, chain: Chain) -> tuple[Report, ChainReport]:
    with (
        psycopg.connect(database_url, autocommit=True) as conn,
        psycopg.connect(database_url, autocommit=True) as ledger,
    ):
        report = verify(conn, ledger, oracle.public_key, source=BRIDGE_RECORD)
        return report, audit_chain(conn, chain.w3, chain.deployment)


def test_verify_checks_the_readings_and_the_chain(
    database_url: str, chain: Chain, ed25519_oracle: Oracle, anchored: dict[str, str]
) -> None:
    report, on_chain = _verify(database_url, ed25519_oracle, chain)
    assert report.discrepancy is None, report.discrepancy
    assert on_chain.discrepancy is None, on_chain.discrepancy
    assert (report.entries, report.anchored_readings) == (2, 7)
    assert on_chain.batches == 2
    assert on_chain.direct_units == 20 * UNITS_PER_WH  # batch 2: Alice's 20 Wh, direct
    assert on_chain.claim_units == (30 + 20 + 7) * UNITS_PER_WH  # batch 1: a, b, c in the tree
    assert on_chain.total_supply == 20 * UNITS_PER_WH

    keys = chain.keys  # Bob claims his leaf; the oracle releases c's to Alice
    rows = query(database_url, "SELECT meter_id, owner_wallet, export_delta_wh, import_delta_wh"
                 ' FROM bridge_mints WHERE batch = 1 ORDER BY meter_id COLLATE "C"')  # fmt: skip
    p = plan(1, [Mint(m, w, int(e), int(i)) for m, w, e, i in rows], direct_max=1)
    index_b = [leaf.meter_id for leaf in p.leaves].index(anchored["b"])
    index_c = [leaf.meter_id for leaf in p.leaves].index(anchored["c"])
    leaf_b, leaf_c = p.leaves[index_b], p.leaves[index_c]
    chain.send(keys.bob, chain.anchor.functions.claim(
        1, index_b, keys.bob.address, leaf_b.units, leaf_b.meter_id, p.proof(index_b)))  # fmt: skip
    release = chain.anchor.functions.release(
        1, index_c, leaf_c.units, leaf_c.meter_id, p.proof(index_c), keys.alice.address
    )
    chain.send(keys.oracle, release)
    _, on_chain = _verify(database_url, ed25519_oracle, chain)
    assert on_chain.discrepancy is None, on_chain.discrepancy
    assert on_chain.claimed_units == (20 + 7) * UNITS_PER_WH
    assert on_chain.total_supply == (20 + 20 + 7) * UNITS_PER_WH


def test_verify_finds_an_edited_mint_and_an_anchor_the_record_lacks(
    database_url: str, chain: Chain, ed25519_oracle: Oracle, anchored: dict[str, str]
) -> None:
    edit = "UPDATE bridge_mints SET export_delta_wh = %s, grid_units = %s * 1000000000000000" \
        " WHERE batch = 1 AND meter_id = %s"  # fmt: skip
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(edit, (31, 31, anchored["a"]))
    report, _ = _verify(database_url, ed25519_oracle, chain)
    assert report.discrepancy is not None
    assert "mint" in report.discrepancy.detail
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(edit, (30, 30, anchored["a"]))
    assert _verify(database_url, ed25519_oracle, chain)[1].discrepancy is None

    ((prev,),) = query(database_url, "SELECT entry_hash FROM bridge_batches WHERE batch = 2")
    stray = sealed_entry(3, bytes(prev), [bytes(32)], [], generate_private_key("EdDSA"))
    chain.send(chain.keys.oracle, chain.anchor.functions.anchor(
        stray.header.encode(), stray.signature, (bytes(32), 0, 0), [], []))  # fmt: skip
    _, on_chain = _verify(database_url, ed25519_oracle, chain)
    assert on_chain.discrepancy == "the chain's head is batch 3, the record's 2"


def test_a_ledger_proof_is_accepted_by_the_contract_view(
    database_url: str, chain: Chain, anchored: dict[str, str]
) -> None:
    hashes = query(database_url, "SELECT reading_hash FROM reading_log ORDER BY ts")
    with psycopg.connect(database_url, autocommit=True) as conn:
        for (reading_hash,) in hashes:
            proof: dict[str, Any] = build_proof(conn, bytes(reading_hash))
            path = [bytes.fromhex(h) for h in proof["audit_path"]]
            view = chain.anchor.functions.verifyReading(
                proof["entry"]["batch"], bytes(reading_hash), proof["leaf_index"], path
            )
            assert view.call() is True
            wrong = chain.anchor.functions.verifyReading(
                proof["entry"]["batch"], bytes(32), proof["leaf_index"], path
            )
            assert wrong.call() is False


def test_grid_of_a_meter_that_links_an_evm_wallet_later_is_released_to_it_once(
    database_url: str, chain: Chain, ed25519_oracle: Oracle, anchored: dict[str, str]
) -> None:
    keys = chain.keys
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert release_linked(conn, chain.w3, chain.deployment, keys.oracle, timeout_s=30) == []
        conn.execute(
            "UPDATE meters SET owner_wallet = %s WHERE meter_id = %s",
            (f"eip155:1337:{keys.bob.address}", anchored["c"]),
        )
        (released,) = release_linked(conn, chain.w3, chain.deployment, keys.oracle, timeout_s=30)
        assert release_linked(conn, chain.w3, chain.deployment, keys.oracle, timeout_s=30) == []
    assert (released.batch, released.meter_id, released.to) == (1, anchored["c"], keys.bob.address)
    assert released.units == 7 * UNITS_PER_WH
    assert chain.grid.functions.balanceOf(keys.bob.address).call() == 7 * UNITS_PER_WH
    _, on_chain = _verify(database_url, ed25519_oracle, chain)
    assert on_chain.discrepancy is None, on_chain.discrepancy
    assert on_chain.claimed_units == 7 * UNITS_PER_WH
