"""GridAnchor and GRID on a real dev node: anchoring once and in order, the oracle role,
the on-chain RFC 6962 reading proof, direct mints, claims and releases, and every forgery
reverting with its own error."""

from __future__ import annotations

import hashlib

from fixtures.chain import Chain, reverts, sealed_entry

from meterproof.bridge.entry import GENESIS, Entry
from meterproof.bridge.evm.claims import ZERO_ADDRESS, Plan, plan
from meterproof.bridge.mint import UNITS_PER_WH, Mint
from meterproof.schemas.merkle import audit_path
from meterproof.schemas.signatures import generate_private_key

ORACLE_ED25519 = generate_private_key("EdDSA")


def _readings(n: int, salt: str) -> list[bytes]:
    return [hashlib.sha256(f"{salt}-{i}".encode()).digest() for i in range(n)]


def _anchor_call(chain: Chain, entry: Entry, p: Plan) -> object:
    return chain.anchor.functions.anchor(
        entry.header.encode(), entry.signature, (p.root, len(p.leaves), p.claim_total),
        [a for a, _ in p.direct], [u for _, u in p.direct],
    )  # fmt: skip


def _anchor(chain: Chain, entry: Entry, p: Plan) -> None:
    receipt = chain.send(chain.keys.oracle, _anchor_call(chain, entry, p))
    assert receipt["status"] == 1


def test_grid_is_an_18_decimal_token_only_the_anchor_mints(chain: Chain) -> None:
    assert chain.grid.functions.decimals().call() == 18
    assert chain.grid.functions.symbol().call() == "GRID"
    assert chain.grid.functions.minter().call() == chain.deployment.anchor
    mint = chain.grid.functions.mint(chain.keys.alice.address, 1)
    assert reverts(mint, chain.keys.oracle.address) == "NotMinter"
    assert reverts(mint, chain.keys.admin.address) == "NotMinter"


def test_a_batch_is_anchored_once_in_order_by_the_oracle_and_its_readings_verify(
    chain: Chain,
) -> None:
    alice = f"eip155:1337:{chain.keys.alice.address}"
    readings = _readings(7, "b1")
    mints = [Mint("m-1", alice, 1500, 0), Mint("m-2", None, 250, 3)]
    entry = sealed_entry(1, GENESIS, readings, mints, ORACLE_ED25519)
    p = plan(1, entry.mints, direct_max=10)
    stranger = chain.keys.bob.address
    assert reverts(_anchor_call(chain, entry, p), stranger) == "NotOracle"
    _anchor(chain, entry, p)

    stored = chain.anchor.functions.batches(1).call()
    assert bytes(stored[0]) == entry.header.entry_hash
    assert bytes(stored[1]) == entry.header.merkle_root
    assert stored[4] == 7  # readingCount
    assert chain.grid.functions.balanceOf(chain.keys.alice.address).call() == 1500 * UNITS_PER_WH
    assert chain.anchor.functions.head().call() == 1
    # the second submission of the same batch reverts, whoever sends it
    oracle = chain.keys.oracle.address
    assert reverts(_anchor_call(chain, entry, p), oracle) == "AlreadyAnchored"
    # batch 3 before 2, and a batch 2 that names another predecessor
    third = sealed_entry(3, entry.header.entry_hash, readings, [], ORACLE_ED25519)
    assert reverts(_anchor_call(chain, third, plan(3, [], direct_max=10)), oracle) == "OutOfOrder"
    forked = sealed_entry(2, bytes(32), readings, [], ORACLE_ED25519)
    assert reverts(_anchor_call(chain, forked, plan(2, [], direct_max=10)), oracle) == "OutOfOrder"

    verify = chain.anchor.functions.verifyReading
    for index in (0, 5, 6):
        path = audit_path(readings, index)
        assert verify(1, readings[index], index, path).call() is True
        assert verify(1, readings[index], (index + 1) % 7, path).call() is False
        tampered = [bytes(31) + b"\x01", *path[1:]]
        assert verify(1, readings[index], index, tampered).call() is False
        assert verify(2, readings[index], index, path).call() is False  # not anchored
    assert verify(1, _readings(1, "other")[0], 0, audit_path(readings, 0)).call() is False


def test_the_admin_rotates_the_oracle_and_nobody_else_can(chain: Chain) -> None:
    keys = chain.keys
    rotate = chain.anchor.functions.setOracle(keys.bob.address)
    assert reverts(rotate, keys.oracle.address) == "OwnableUnauthorizedAccount"
    chain.send(keys.admin, rotate)
    assert chain.anchor.functions.oracle().call() == keys.bob.address
    entry = sealed_entry(1, GENESIS, _readings(2, "rot"), [], ORACLE_ED25519)
    p = plan(1, [], direct_max=0)
    assert reverts(_anchor_call(chain, entry, p), keys.oracle.address) == "NotOracle"
    chain.send(keys.bob, _anchor_call(chain, entry, p))
    assert chain.anchor.functions.head().call() == 1


def test_claims_mint_once_and_forged_or_replayed_claims_revert(chain: Chain) -> None:
    keys = chain.keys
    mints = [
        Mint("m-a", f"eip155:1337:{keys.alice.address}", 1000, 0),
        Mint("m-b", f"eip155:1:{keys.bob.address}", 2000, 0),
        Mint("m-c", "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp:" + "1" * 32, 300, 0),
        Mint("m-d", "legacy-wallet-text", 400, 0),
        Mint("m-e", None, 0, 12),  # import only: mints nothing, no leaf
    ]
    entry = sealed_entry(1, GENESIS, _readings(3, "c"), mints, ORACLE_ED25519)
    p = plan(1, entry.mints, direct_max=1)  # two wallets > 1: everything goes to the tree
    assert p.direct == ()
    assert [leaf.meter_id for leaf in p.leaves] == ["m-a", "m-b", "m-c", "m-d"]
    assert [leaf.account for leaf in p.leaves][2:] == [ZERO_ADDRESS, ZERO_ADDRESS]
    _anchor(chain, entry, p)
    a = p.leaves[0]

    def claim(index: int, account: str, units: int, meter: str, path: list[bytes]) -> object:
        return chain.anchor.functions.claim(1, index, account, units, meter, path)

    forged = claim(0, a.account, a.units * 2, a.meter_id, p.proof(0))
    assert reverts(forged, keys.bob.address) == "InvalidProof"
    stolen = claim(0, keys.bob.address, a.units, a.meter_id, p.proof(0))
    assert reverts(stolen, keys.bob.address) == "InvalidProof"
    chain.send(keys.bob, claim(0, a.account, a.units, a.meter_id, p.proof(0)))  # anyone sends
    assert chain.grid.functions.balanceOf(keys.alice.address).call() == a.units
    replay = claim(0, a.account, a.units, a.meter_id, p.proof(0))
    assert reverts(replay, keys.alice.address) == "AlreadyClaimed"
    assert chain.anchor.functions.isClaimed(1, 0).call() is True
    assert chain.anchor.functions.isClaimed(1, 1).call() is False

    c = p.leaves[2]  # no EVM wallet at sealing: only the oracle releases it, to the new link
    unlinked = claim(2, c.account, c.units, c.meter_id, p.proof(2))
    assert reverts(unlinked, keys.bob.address) == "NoAccount"
    release = chain.anchor.functions.release(
        1, 2, c.units, c.meter_id, p.proof(2), keys.bob.address
    )
    assert reverts(release, keys.bob.address) == "NotOracle"
    chain.send(keys.oracle, release)
    assert chain.grid.functions.balanceOf(keys.bob.address).call() == c.units
    assert reverts(release, keys.oracle.address) == "AlreadyClaimed"
    stored = chain.anchor.functions.batches(1).call()
    assert stored[6] == p.claim_total == 3700 * UNITS_PER_WH  # claimTotal
    assert stored[7] == a.units + c.units  # claimed
    assert chain.grid.functions.totalSupply().call() == a.units + c.units


def test_direct_minting_sums_each_wallet_and_leaves_the_unlinked_claimable(chain: Chain) -> None:
    alice = f"eip155:1337:{chain.keys.alice.address}"
    mints = [Mint("m-1", alice, 100, 0), Mint("m-2", alice, 50, 0), Mint("m-3", None, 7, 0)]
    entry = sealed_entry(1, GENESIS, _readings(2, "d"), mints, ORACLE_ED25519)
    p = plan(1, entry.mints, direct_max=5)
    assert p.direct == ((chain.keys.alice.address, 150 * UNITS_PER_WH),)
    assert [leaf.meter_id for leaf in p.leaves] == ["m-3"]
    _anchor(chain, entry, p)
    assert chain.grid.functions.balanceOf(chain.keys.alice.address).call() == 150 * UNITS_PER_WH
    stored = chain.anchor.functions.batches(1).call()
    assert (stored[5], stored[6], stored[8]) == (1, 7 * UNITS_PER_WH, 150 * UNITS_PER_WH)
