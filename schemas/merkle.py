"""RFC 6962 (RFC 9162 section 2.1) Merkle Tree Hash and audit paths over SHA-256.

Built bottom-up, level by level: pairing neighbours and promoting a lone last node gives
exactly the RFC's split at the largest power of two, without recursion, so a million
leaves cost two million SHA-256 calls and no deep call stack.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
_LEAF: Final = b"\x00"
_NODE: Final = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(_LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def _next_level(level: Sequence[bytes]) -> list[bytes]:
    sha = hashlib.sha256
    pairs = [sha(_NODE + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        pairs.append(level[-1])
    return pairs


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """MTH over the leaf data (here: the 32 raw bytes of each `reading_hash`)."""
    if not leaves:
        return EMPTY_ROOT
    sha = hashlib.sha256
    level = [sha(_LEAF + d).digest() for d in leaves]
    while len(level) > 1:
        level = _next_level(level)
    return level[0]


def audit_path(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(index, D[n]): the sibling hashes from the leaf up to the root."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} outside a tree of {len(leaves)}")
    sha = hashlib.sha256
    level = [sha(_LEAF + d).digest() for d in leaves]
    path: list[bytes] = []
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        level = _next_level(level)
        index //= 2
    return path


def verify_inclusion(
    leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 2.1.3.2: recompute the root from one leaf's data and its audit path."""
    if not 0 <= index < size:
        return False
    fn, sn = index, size - 1
    r = leaf_hash(leaf)
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root
