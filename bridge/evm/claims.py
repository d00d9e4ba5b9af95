"""Where a batch's GRID goes on chain (pure): minted directly in the anchoring transaction,
or committed as an RFC 6962 claim tree whose leaves are claimed one by one.

A mint's destination is the EVM address of the meter's CAIP-10 `owner_wallet` at sealing
time. A meter without one (NULL, a `solana:` account, an unparseable legacy value, or the
zero address itself, which GRID refuses to mint to) gets a leaf with the zero address and
its meter id: the oracle releases it to the wallet linked later. Direct minting costs the
oracle gas per wallet, a claim tree costs it one root, so small batches go direct and large
ones to the tree (docs/anchoring.md section 12 has the measured gas of both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from meterproof.bridge.mint import Mint
from meterproof.registry.accounts import AccountId
from meterproof.registry.errors import InvalidInputError
from meterproof.schemas.merkle import audit_path, merkle_root

ZERO_ADDRESS: Final = "0x" + "00" * 20


def evm_destination(wallet: str | None) -> str | None:
    """The 0x address GRID can be minted to, or None: it stays claimable by meter id.

    The zero address is None too: registration and wallet links refuse it, but a row
    written around them (SQL, COPY) must not put it in `anchor`'s mints, where GRID's
    `ERC20InvalidReceiver` would revert every attempt and hold every later batch."""
    if wallet is None:
        return None
    try:
        address = AccountId.parse(wallet).evm_address
    except InvalidInputError:
        return None
    return None if address == ZERO_ADDRESS else address


@dataclass(frozen=True, slots=True)
class Leaf:
    meter_id: str
    account: str  #: 0x address, the zero address when the meter has no EVM wallet
    units: int

    def data(self, batch: int) -> bytes:
        """What the contract's claimLeaf hashes: batch (8) || account (20) || units (32) ||
        meter id (ASCII), after the RFC 6962 leaf prefix 0x00."""
        return (
            batch.to_bytes(8, "big")
            + bytes.fromhex(self.account[2:])
            + self.units.to_bytes(32, "big")
            + self.meter_id.encode("ascii")
        )


@dataclass(frozen=True, slots=True)
class Plan:
    batch: int
    direct: tuple[tuple[str, int], ...]  #: (address, units), one per wallet
    leaves: tuple[Leaf, ...]

    @property
    def root(self) -> bytes:
        if not self.leaves:
            return bytes(32)
        return merkle_root([leaf.data(self.batch) for leaf in self.leaves])

    @property
    def claim_total(self) -> int:
        return sum(leaf.units for leaf in self.leaves)

    @property
    def direct_total(self) -> int:
        return sum(units for _, units in self.direct)

    def proof(self, index: int) -> list[bytes]:
        return audit_path([leaf.data(self.batch) for leaf in self.leaves], index)


def plan(batch: int, mints: Sequence[Mint], *, direct_max: int) -> Plan:
    """Wallets summed; direct when there are at most `direct_max` of them, else every mint
    becomes a leaf (in the mint list's meter-id order). Import-only lines mint nothing."""
    owned: dict[str, int] = {}
    leaves: list[Leaf] = []
    for m in mints:
        if m.units == 0:
            continue
        address = evm_destination(m.wallet)
        if address is None:
            leaves.append(Leaf(m.meter_id, ZERO_ADDRESS, m.units))
        else:
            owned[address] = owned.get(address, 0) + m.units
    if len(owned) <= direct_max:
        return Plan(batch, tuple(sorted(owned.items())), tuple(leaves))
    every = []
    for m in mints:
        if m.units:
            account = evm_destination(m.wallet) or ZERO_ADDRESS
            every.append(Leaf(m.meter_id, account, m.units))
    return Plan(batch, (), tuple(every))
