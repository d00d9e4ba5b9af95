"""`ledger verify` and `ledger proof` with the `evm` sink: the readings against the
bridge's record, the record against the chain (anchors, claim trees, GRID per wallet,
total supply), and a reading's proof accepted by the contract's view."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from bridge_harness import EPOCH_MS, T0, Clock, make_fleet, query, settings_for
from fixtures.chain import Chain, sealed_entry

from meterproof.bridge.batches import BatchStore
from meterproof.bridge.evm.audit import ChainReport, audit_chain
from meterproof.bridge.evm.claims import plan
from meterproof.bridge.evm.client import Deployment, contracts, load_key
from meterproof.bridge.evm.journal import Journal, Sent
from meterproof.bridge.evm.release import release_linked
from meterproof.bridge.evm.sink import EvmSink
from meterproof.bridge.mint import UNITS_PER_WH, Mint
from meterproof.bridge.oracle import Oracle
from meterproof.bridge.proof import build_proof
from meterproof.bridge.runner import Runner
from meterproof.bridge.telemetry import RELEASES
from meterproof.bridge.verify import BRIDGE_RECORD, Report, verify
from meterproof.errors import MeterproofError
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


def test_verify_counts_the_batch_on_chain_that_the_record_has_not_marked_anchored(
    database_url: str, chain: Chain, ed25519_oracle: Oracle, anchored: dict[str, str]
) -> None:
    """Sent and N deep, not yet marked (the bridge stopped in between): batch 2, whose 20 Wh
    went to Alice directly, is pending in the record, and GRID's Transfer events hold its
    mint. It is checked and counted as an anchor; a second such batch is a discrepancy."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert BatchStore(conn).reopen(2) == 1
    report, on_chain = _verify(database_url, ed25519_oracle, chain)
    assert report.discrepancy is None, report.discrepancy
    assert report.entries == 1
    assert on_chain.discrepancy is None, on_chain.discrepancy
    assert (on_chain.batches, on_chain.unmarked) == (2, 1)
    assert on_chain.direct_units == on_chain.total_supply == 20 * UNITS_PER_WH

    with psycopg.connect(database_url, autocommit=True) as conn:
        assert BatchStore(conn).reopen(1) == 1
    _, on_chain = _verify(database_url, ed25519_oracle, chain)
    assert on_chain.discrepancy == (
        "batch 2: a second batch on chain that the record has not marked anchored"
        " (one may be: sent, not yet marked)"
    )


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


def test_a_release_waits_for_an_anchor_the_bridge_has_in_flight(
    database_url: str, chain: Chain, anchored: dict[str, str]
) -> None:
    """The oracle account's next nonce is the bridge's while its journalled anchor waits to
    be mined: a release sent now would take it, and one of the two would be dropped. So
    `chain release` sends nothing (`anchor_in_flight`, counted as deferred) until it is."""
    keys = chain.keys
    nonce = chain.w3.eth.get_transaction_count(keys.oracle.address)
    waiting = Sent(bytes(range(32)), nonce, 10**10, 10**9, b"\x02")  # signed, in the pool
    Journal(database_url, timeout_s=2).record(
        "epoch:3:root", chain_id=chain.deployment.chain_id, sender=keys.oracle.address,
        sent=waiting,
    )  # fmt: skip
    deferred = RELEASES.labels(outcome="deferred")
    before = deferred._value.get()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE meters SET owner_wallet = %s WHERE meter_id = %s",
            (f"eip155:1337:{keys.bob.address}", anchored["c"]),
        )
        with pytest.raises(MeterproofError, match=r"anchor_in_flight: .* 0x000102.* \(nonce"):
            release_linked(conn, chain.w3, chain.deployment, keys.oracle, timeout_s=30)
        assert deferred._value.get() == before + 1
        assert chain.w3.eth.get_transaction_count(keys.oracle.address) == nonce  # sent nothing
        signed = keys.oracle.sign_transaction({
            "to": keys.oracle.address, "value": 0, "gas": 21_000, "nonce": nonce,
            "maxFeePerGas": 10**10, "maxPriorityFeePerGas": 10**9,
            "chainId": chain.deployment.chain_id,
        })  # fmt: skip
        chain.w3.eth.wait_for_transaction_receipt(
            chain.w3.eth.send_raw_transaction(signed.raw_transaction)
        )  # that nonce mined: nothing of the bridge's is in flight any more
        (released,) = release_linked(conn, chain.w3, chain.deployment, keys.oracle, timeout_s=30)
    assert (released.meter_id, released.to) == (anchored["c"], keys.bob.address)
    assert chain.grid.functions.balanceOf(keys.bob.address).call() == 7 * UNITS_PER_WH


def _environ(folder: Path, chain: Chain, database_url: str) -> dict[str, str]:
    """The bridge's settings for the `evm` sink, with its files in `folder`."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("METERPROOF_")},
        "METERPROOF_STACK_ENV": str(folder / "none.env"),
        "METERPROOF_DATABASE_URL": database_url,
        "METERPROOF_SINK": "evm",
        "METERPROOF_EVM_RPC_URL": chain.node.url,
        "METERPROOF_EVM_CONTRACTS_FILE": str(folder / "contracts.json"),
        "METERPROOF_EVM_ORACLE_KEY_FILE": str(folder / "oracle.key"),
    }


def _key_file(path: Path, key: str) -> Path:
    """An EVM key file as `chain deploy` writes one: mode 0600."""
    path.touch(mode=0o600)
    path.write_text(key)
    return path


def _cli(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-P", "-m", "meterproof", *args]
    return subprocess.run(argv, env=environ, capture_output=True, text=True, check=False,
                          timeout=60)  # fmt: skip


@pytest.mark.slow
def test_the_commands_verify_against_the_chain_and_check_a_proof_on_chain(
    database_url: str,
    chain: Chain,
    ed25519_oracle: Oracle,
    anchored: dict[str, str],
    tmp_path: Path,
) -> None:
    chain.deployment.save(tmp_path / "contracts.json")
    _key_file(tmp_path / "oracle.key", chain.keys.oracle.key.to_0x_hex())
    environ = _environ(tmp_path, chain, database_url)
    pem = tmp_path / "oracle.pub.pem"
    pem.write_bytes(ed25519_oracle.key.public_key().pem().encode())
    done = _cli(environ, "ledger", "verify", "--oracle-pub", str(pem))
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first.startswith("OK 2 entries, 7 anchored readings")
    assert second.startswith("OK chain: 2 anchors")

    ((reading_hash,),) = query(database_url, "SELECT encode(reading_hash, 'hex') FROM reading_log"
                               " ORDER BY ts LIMIT 1")  # fmt: skip
    proof = _cli(environ, "ledger", "proof", reading_hash)
    assert proof.returncode == 0, proof.stderr
    (tmp_path / "proof.json").write_text(proof.stdout)
    checked = _cli(environ, "chain", "check-proof", str(tmp_path / "proof.json"))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(f"OK GridAnchor {chain.deployment.anchor}.verifyReading")
    forged = json.loads(proof.stdout)
    forged["reading_hash"] = "00" * 32
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    refused = _cli(environ, "chain", "check-proof", str(tmp_path / "forged.json"))
    assert refused.returncode == 1
    assert refused.stdout.startswith("INVALID")


@pytest.mark.slow
def test_chain_deploy_writes_the_contracts_file_naming_a_new_oracle(
    database_url: str, chain: Chain, tmp_path: Path
) -> None:
    admin_file = _key_file(tmp_path / "admin.key", chain.keys.admin.key.to_0x_hex())
    done = _cli(_environ(tmp_path, chain, database_url), "chain", "deploy",
                "--admin-key-file", str(admin_file))  # fmt: skip
    assert done.returncode == 0, done.stderr
    deployed = Deployment.load(tmp_path / "contracts.json")
    assert deployed.anchor != chain.deployment.anchor
    oracle = load_key(tmp_path / "oracle.key")  # created by the command
    assert oracle.address not in {chain.keys.oracle.address, chain.keys.admin.address}
    anchor, _ = contracts(chain.w3, deployed)
    assert anchor.functions.oracle().call() == oracle.address
    assert anchor.functions.owner().call() == chain.keys.admin.address
    assert (tmp_path / "oracle.key").stat().st_mode & 0o077 == 0
