"""Inclusion proofs: a reading's RFC 6962 audit path to its batch root, plus the signed
entry that commits to that root, as one JSON document checkable offline.

Checking needs no meterproof code: recompute the root from the 32 raw bytes of
reading_hash, leaf_index, tree_size and audit_path (RFC 9162 section 2.1.3.2), compare it
with the entry's merkle_root, rebuild the 164 header bytes from the entry's fields, check
the Ed25519 signature with oracle_key, and compare oracle_key with the published one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg.rows import tuple_row

from meterproof.bridge.entry import Entry, EntryError, Header, entry_json, header_from_json
from meterproof.bridge.ledger.sink import Receipt
from meterproof.bridge.mint import Mint
from meterproof.errors import NotFoundError
from meterproof.schemas.merkle import audit_path, verify_inclusion
from meterproof.schemas.signatures import Ed25519Public

PROOF_VERSION: Final = 1
HASH_RULE: Final = (
    "RFC 6962 Merkle Tree Hash, SHA-256, leaf data = the 32 raw bytes of reading_hash"
)
_FIND: Final = """
SELECT l.batch_id, b.status, b.epoch, b.epoch_ms FROM reading_log l
LEFT JOIN bridge_batches b ON b.batch = l.batch_id
WHERE l.reading_hash = %s
"""
_LEAVES: Final = """
SELECT string_agg(reading_hash, ''::bytea ORDER BY ts, meter_id COLLATE "C", seq)
FROM reading_log WHERE batch_id = %s
"""
_ENTRY: Final = "SELECT header, signature, receipt FROM bridge_batches WHERE batch = %s"
_MINTS: Final = """
SELECT meter_id, owner_wallet, export_delta_wh, import_delta_wh FROM bridge_mints
WHERE batch = %s ORDER BY meter_id COLLATE "C"
"""


class ProofError(NotFoundError):
    """No proof for this reading (yet); `str()` says why in one line."""


@dataclass(frozen=True, slots=True)
class Checked:
    batch: int
    leaf_index: int
    tree_size: int
    oracle_key: bytes


def build_proof(conn: psycopg.Connection[Any], reading_hash: bytes) -> dict[str, Any]:
    with conn.cursor(row_factory=tuple_row) as cur:
        found = cur.execute(_FIND, (reading_hash,)).fetchone()
        if found is None:
            raise ProofError(f"reading {reading_hash.hex()} is not stored")
        batch, status, epoch, epoch_ms = found
        if batch is None:
            raise ProofError(f"reading {reading_hash.hex()} is not claimed by a batch yet")
        if status != "anchored":
            state = "still open" if status == "open" else "sealed but not anchored yet"
            raise ProofError(
                f"reading {reading_hash.hex()} is in batch {batch} (epoch {epoch} of"
                f" {epoch_ms} ms), {state}"
            )
        row = cur.execute(_LEAVES, (batch,)).fetchone()
        assert row is not None
        blob = bytes(row[0])
        leaves = [blob[i : i + 32] for i in range(0, len(blob), 32)]
        index = leaves.index(reading_hash)
        sealed = cur.execute(_ENTRY, (batch,)).fetchone()
        assert sealed is not None
        header, signature, receipt = sealed
        mints = tuple(
            Mint(str(m), w, int(e), int(i)) for m, w, e, i in cur.execute(_MINTS, (batch,))
        )
    entry = Entry(Header.decode(bytes(header)), bytes(signature), mints)
    path = audit_path(leaves, index)
    return {
        "version": PROOF_VERSION,
        "hash": HASH_RULE,
        "reading_hash": reading_hash.hex(),
        "leaf_index": index,
        "tree_size": len(leaves),
        "audit_path": [p.hex() for p in path],
        "merkle_root": entry.header.merkle_root.hex(),
        "entry": entry_json(entry, with_mints=False),
        "receipt": Receipt.from_json(receipt).to_json(),
    }


def check_proof(proof: dict[str, Any], *, trusted_key: bytes | None) -> Checked:
    """Raise ProofError naming the first thing that does not hold."""
    try:
        leaf = bytes.fromhex(proof["reading_hash"])
        index, size = int(proof["leaf_index"]), int(proof["tree_size"])
        path = [bytes.fromhex(p) for p in proof["audit_path"]]
        root = bytes.fromhex(proof["merkle_root"])
        view = proof["entry"]
        header = header_from_json(view)
        signature = bytes.fromhex(view["signature"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProofError(f"not a meterproof inclusion proof: {exc}") from None
    except EntryError as exc:
        raise ProofError(str(exc)) from None
    if len(leaf) != 32:
        raise ProofError("reading_hash must be 32 bytes")
    if not verify_inclusion(leaf, index, size, path, root):
        raise ProofError("the audit path does not lead from the reading to merkle_root")
    if root != header.merkle_root or size != header.reading_count:
        raise ProofError("merkle_root or tree_size differ from the signed entry's")
    if view.get("entry_hash") != header.entry_hash.hex():
        raise ProofError("entry_hash is not the SHA-256 of the header bytes")
    if not Ed25519Public(header.oracle_key).verify(signature, header.encode()):
        raise ProofError("the oracle signature over the entry header does not verify")
    if trusted_key is not None and header.oracle_key != trusted_key:
        raise ProofError(f"signed by ed25519:{header.oracle_key.hex()}, not the trusted key")
    return Checked(header.batch, index, size, header.oracle_key)
