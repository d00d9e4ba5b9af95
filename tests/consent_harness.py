"""Wallets and signatures for consent tests: a real EVM key (eth-account) and a real Ed25519
key (PyNaCl) that sign documents the way wallet apps do, and a meter's confirmation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import base58
import nacl.signing
import psycopg
from eth_account import Account
from eth_account.messages import encode_defunct

from meterproof.consent import repository as consents
from meterproof.registry import wallets
from meterproof.registry.accounts import AccountId
from meterproof.schemas.reading import b64url
from meterproof.schemas.signatures import PrivateKey

SOLANA_REF = "5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"


@dataclass(frozen=True)
class EvmWallet:
    key: Any  # eth_account LocalAccount
    account: AccountId

    @classmethod
    def new(cls) -> EvmWallet:
        key = Account.create()
        return cls(key, AccountId.parse(f"eip155:1337:{key.address}"))

    def sign(self, document: str) -> str:
        return "0x" + self.key.sign_message(encode_defunct(text=document)).signature.hex()


@dataclass(frozen=True)
class Ed25519Wallet:
    key: nacl.signing.SigningKey
    account: AccountId

    @classmethod
    def new(cls) -> Ed25519Wallet:
        key = nacl.signing.SigningKey.generate()
        address = base58.b58encode(bytes(key.verify_key)).decode()
        return cls(key, AccountId.parse(f"solana:{SOLANA_REF}:{address}"))

    def sign(self, document: str) -> str:
        return base58.b58encode(self.key.sign(document.encode()).signature).decode()


Wallet = EvmWallet | Ed25519Wallet


def meter_kid(conn: psycopg.Connection[Any], meter_id: str) -> str:
    row = conn.execute(
        "SELECT k.kid FROM meter_keys k JOIN meters m ON m.id = k.meter WHERE m.meter_id = %s",
        (meter_id,),
    ).fetchone()
    assert row is not None
    return str(row[0])


def link(
    conn: psycopg.Connection[Any], meter_id: str, meter_key: PrivateKey, wallet: Wallet
) -> wallets.WalletLink:
    """Both proofs, as the owner and the meter give them."""
    challenge = wallets.issue_link_challenge(conn, meter_id, wallet.account)
    return wallets.link_wallet(
        conn,
        meter_id=meter_id,
        account=wallet.account,
        challenge_id=challenge.id,
        wallet_signature=wallet.sign(challenge.document),
        meter_kid=meter_kid(conn, meter_id),
        meter_signature=b64url(meter_key.sign(challenge.document.encode())),
    )


def owner_grant(
    conn: psycopg.Connection[Any], request: consents.GrantRequest, wallet: Wallet
) -> consents.Consent:
    challenge = consents.request_grant(conn, request, wallet.account)
    return consents.grant(
        conn,
        request,
        signer=wallet.account,
        challenge_id=challenge.id,
        signature=wallet.sign(challenge.document),
    )
