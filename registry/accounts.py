"""Wallet accounts, named chain-agnostically (CAIP-10), and the proof that one signed a text.

An account id is `namespace:reference:address`. Two namespaces are understood:

- `eip155:<chain id>:<0x address>`: an EVM account (secp256k1). Its signatures are
  EIP-191 personal-sign (`0x` + 65 bytes hex, as wallets' `personal_sign` returns);
  the address is recovered from the signature by eth-account and compared.
- `solana:<genesis hash prefix>:<base58 public key>`: an Ed25519 account, seed 000's
  base58 wallet addresses. The address is the key; signatures are base58 (as wallets'
  `signMessage` results are usually shown) over the UTF-8 text itself.

Addresses are kept in one normal form (EIP-55 checksum case for EVM), so the same
account is always the same string: in a link, in a consent and in a mint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import base58
from eth_utils.address import to_checksum_address

from meterproof.registry.errors import InvalidInputError
from meterproof.schemas.signatures import Ed25519Public

EVM: Final = "eip155"
ED25519: Final = "solana"
NAMESPACES: Final = (EVM, ED25519)

_CAIP10: Final = re.compile(r"^([-a-z0-9]{3,8}):([-_a-zA-Z0-9]{1,32}):([-.%a-zA-Z0-9]{1,128})$")
_CHAIN_ID: Final = re.compile(r"^[1-9][0-9]{0,17}$")
_EVM_ADDRESS: Final = re.compile(r"^0x[0-9a-fA-F]{40}$")
_EVM_SIGNATURE: Final = re.compile(r"^0x[0-9a-fA-F]{130}$")
_BASE58: Final = re.compile(r"^[1-9A-HJ-NP-Za-km-z]+$")


class BadSignatureError(InvalidInputError):
    """The signature does not verify for this account over this text."""


@dataclass(frozen=True, slots=True)
class AccountId:
    """A parsed, normalised CAIP-10 account id; `str()` gives the canonical form."""

    namespace: str
    reference: str
    address: str

    def __str__(self) -> str:
        return f"{self.namespace}:{self.reference}:{self.address}"

    @classmethod
    def parse(cls, text: str) -> AccountId:
        """Check and normalise `text`; raise InvalidInputError saying what is wrong."""
        match = _CAIP10.match(text.strip())
        if match is None:
            raise InvalidInputError(
                f"not a CAIP-10 account id (namespace:reference:address): {text[:80]!r}"
            )
        namespace, reference, address = match.groups()
        if namespace == EVM:
            if not _CHAIN_ID.match(reference):
                raise InvalidInputError(f"eip155 needs a decimal chain id, not {reference!r}")
            if not _EVM_ADDRESS.match(address):
                raise InvalidInputError(f"not an EVM address (0x + 40 hex): {address!r}")
            return cls(namespace, reference, to_checksum_address(address))
        if namespace == ED25519:
            if not _BASE58.match(address) or len(_b58(address, "address")) != 32:
                raise InvalidInputError("a solana address is the base58 of a 32-byte Ed25519 key")
            return cls(namespace, reference, address)
        raise InvalidInputError(
            f"wallet namespace {namespace!r} is not supported (use {' or '.join(NAMESPACES)})"
        )

    def verify(self, text: str, signature: str) -> None:
        """Raise BadSignatureError unless `signature` is this account's over `text`."""
        signature = signature.strip()
        if self.namespace == EVM:
            if not _EVM_SIGNATURE.match(signature):
                raise BadSignatureError("an EVM signature is 0x + 65 bytes of hex (personal_sign)")
            # Imported here: eth-account takes ~0.45 s to import (py_ecc's pairing tables),
            # which every ingest worker paid at start for a check it never makes (wallet
            # links and signed consents are checked by the API and the commands).
            from eth_account import Account
            from eth_account.messages import encode_defunct

            try:
                signer = Account.recover_message(encode_defunct(text=text), signature=signature)
            except Exception as exc:  # eth-account raises several types for bad v/r/s
                raise BadSignatureError(f"the EVM signature does not recover: {exc}") from exc
            if signer != self.address:
                raise BadSignatureError(f"signed by {signer}, not by {self.address}")
            return
        raw = _b58(self.address, "address")
        try:
            key = Ed25519Public(raw)
        except ValueError as exc:  # not 32 bytes
            raise BadSignatureError(f"the Ed25519 signature does not verify for {self}") from exc
        if not key.verify(_b58(signature, "signature"), text.encode("utf-8")):
            raise BadSignatureError(f"the Ed25519 signature does not verify for {self}")

    @property
    def evm_address(self) -> str | None:
        """The 0x address a mint can be sent to, or None for a non-EVM account."""
        return self.address if self.namespace == EVM else None


def _b58(text: str, what: str) -> bytes:
    if not text or not _BASE58.match(text):
        error = BadSignatureError if what == "signature" else InvalidInputError
        raise error(f"the {what} is not base58")
    return base58.b58decode(text)
