"""Ledger entries: canonical header and mint-list bytes, the oracle signature, JSON views.

Pure. Every byte layout here is specified in docs/anchoring.md, so an integrator can
rebuild and check an entry in any language: integers are unsigned big-endian, hashes are
raw 32-byte SHA-256 digests, strings are ASCII with a one-byte length prefix.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from meterproof.bridge.mint import Mint, format_grid
from meterproof.errors import InputError
from meterproof.schemas.signatures import Ed25519Public, PrivateKey

HEADER_MAGIC: Final = b"MPL1"
MINTS_MAGIC: Final = b"MPM1"
#: prev_entry_hash of the first entry.
GENESIS: Final = bytes(32)
_HEADER: Final = struct.Struct(">4sQQQ32s32sQ32s32s")
_MINT_FIXED: Final = struct.Struct(">QQ32s")
HEADER_SIZE: Final = _HEADER.size


class EntryError(InputError):
    """Bytes or fields that do not form a valid entry; `str()` says which part."""


@dataclass(frozen=True, slots=True)
class Header:
    batch: int
    epoch: int
    epoch_ms: int
    prev_hash: bytes
    merkle_root: bytes
    reading_count: int
    mint_hash: bytes
    oracle_key: bytes

    def encode(self) -> bytes:
        return _HEADER.pack(
            HEADER_MAGIC,
            self.batch,
            self.epoch,
            self.epoch_ms,
            self.prev_hash,
            self.merkle_root,
            self.reading_count,
            self.mint_hash,
            self.oracle_key,
        )

    @classmethod
    def decode(cls, data: bytes) -> Header:
        if len(data) != HEADER_SIZE:
            raise EntryError(f"header is {len(data)} bytes, not {HEADER_SIZE}")
        magic, *fields = _HEADER.unpack(data)
        if magic != HEADER_MAGIC:
            raise EntryError(f"header magic {magic!r} is not {HEADER_MAGIC!r}")
        return cls(*fields)

    @property
    def entry_hash(self) -> bytes:
        """What the next entry's prev_hash names: SHA-256 of the header bytes."""
        return hashlib.sha256(self.encode()).digest()

    @property
    def idempotency_key(self) -> str:
        """Epoch, batch number and root: a sink that saw this key has this entry."""
        return f"{self.epoch}:{self.batch}:{self.merkle_root.hex()}"

    @property
    def epoch_start_ms(self) -> int:
        return self.epoch * self.epoch_ms


def encode_mints(mints: Sequence[Mint]) -> bytes:
    parts = [MINTS_MAGIC, struct.pack(">Q", len(mints))]
    for m in mints:
        meter = m.meter_id.encode("ascii")
        wallet = (m.wallet or "").encode("ascii")
        parts += [
            bytes((len(meter),)),
            meter,
            bytes((len(wallet),)),
            wallet,
            _MINT_FIXED.pack(m.export_wh, m.import_wh, m.units.to_bytes(32, "big")),
        ]
    return b"".join(parts)


def mint_hash(mints: Sequence[Mint]) -> bytes:
    return hashlib.sha256(encode_mints(mints)).digest()


@dataclass(frozen=True, slots=True)
class Entry:
    header: Header
    signature: bytes
    mints: tuple[Mint, ...]

    @property
    def minted_units(self) -> int:
        return sum(m.units for m in self.mints)

    def problem(self) -> str | None:
        """Why this entry does not hold together by itself, or None."""
        if mint_hash(self.mints) != self.header.mint_hash:
            return "the mint list does not hash to the header's mint_hash"
        if not Ed25519Public(self.header.oracle_key).verify(self.signature, self.header.encode()):
            return "the oracle signature over the header does not verify"
        return None


def seal(
    *,
    batch: int,
    epoch: int,
    epoch_ms: int,
    prev_hash: bytes,
    merkle_root: bytes,
    reading_count: int,
    mints: Sequence[Mint],
    oracle: PrivateKey,
    oracle_key: bytes,
) -> Entry:
    """Build the header over the batch's commitments and sign it with the oracle key."""
    header = Header(
        batch=batch,
        epoch=epoch,
        epoch_ms=epoch_ms,
        prev_hash=prev_hash,
        merkle_root=merkle_root,
        reading_count=reading_count,
        mint_hash=mint_hash(mints),
        oracle_key=oracle_key,
    )
    return Entry(header, oracle.sign(header.encode()), tuple(mints))


def header_json(header: Header) -> dict[str, Any]:
    return {
        "batch": header.batch,
        "epoch": header.epoch,
        "epoch_ms": header.epoch_ms,
        "epoch_start_ms": header.epoch_start_ms,
        "prev_entry_hash": header.prev_hash.hex(),
        "merkle_root": header.merkle_root.hex(),
        "reading_count": header.reading_count,
        "mint_hash": header.mint_hash.hex(),
        "oracle_key": header.oracle_key.hex(),
    }


def mint_json(mint: Mint) -> dict[str, Any]:
    return {
        "meter_id": mint.meter_id,
        "wallet": mint.wallet,
        "export_delta_wh": mint.export_wh,
        "import_delta_wh": mint.import_wh,
        "grid_units": str(mint.units),
        "grid": format_grid(mint.units),
    }


def entry_json(entry: Entry, *, with_mints: bool = True) -> dict[str, Any]:
    """Every field in hex or decimal strings (GRID units exceed JSON's safe integers)."""
    view = {
        **header_json(entry.header),
        "header": entry.header.encode().hex(),
        "signature": entry.signature.hex(),
        "entry_hash": entry.header.entry_hash.hex(),
        "minted_grid_units": str(entry.minted_units),
        "minted_grid": format_grid(entry.minted_units),
    }
    if with_mints:
        view["mints"] = [mint_json(m) for m in entry.mints]
    return view


def header_from_json(view: dict[str, Any]) -> Header:
    """The header a JSON view describes; `header` hex must encode exactly these fields."""
    try:
        header = Header(
            batch=int(view["batch"]),
            epoch=int(view["epoch"]),
            epoch_ms=int(view["epoch_ms"]),
            prev_hash=bytes.fromhex(view["prev_entry_hash"]),
            merkle_root=bytes.fromhex(view["merkle_root"]),
            reading_count=int(view["reading_count"]),
            mint_hash=bytes.fromhex(view["mint_hash"]),
            oracle_key=bytes.fromhex(view["oracle_key"]),
        )
        encoded = header.encode()
    except (KeyError, TypeError, ValueError, struct.error) as exc:
        raise EntryError(f"entry fields are incomplete or malformed: {exc}") from None
    if encoded.hex() != view.get("header"):
        raise EntryError("the entry's header bytes do not encode its fields")
    return header
