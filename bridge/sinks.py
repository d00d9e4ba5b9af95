"""The ledger sink the `sink` setting names, built from the bridge's settings."""

from __future__ import annotations

from meterproof.bridge.ledger.local import LocalSink
from meterproof.bridge.ledger.sink import LedgerSink
from meterproof.bridge.settings import BridgeSettings
from meterproof.errors import InputError


def open_sink(settings: BridgeSettings, *, trusted_key: bytes) -> LedgerSink:
    """`local`: the PostgreSQL ledger trusting `trusted_key`; `evm`: the contracts of
    `evm_contracts_file`, sent from the account of `evm_oracle_key_file`."""
    if settings.sink == "local":
        return LocalSink(
            settings.database_url, trusted_key=trusted_key, timeout_s=settings.sink_timeout_s
        )
    from meterproof.bridge.evm.client import Deployment, connect, load_key
    from meterproof.bridge.evm.journal import Journal
    from meterproof.bridge.evm.sink import EvmSink

    deployment = Deployment.load(settings.evm_contracts_file)
    if deployment.chain_id != settings.evm_chain_id:
        raise InputError(
            f"{settings.evm_contracts_file} names chain {deployment.chain_id}, the setting"
            f" evm_chain_id is {settings.evm_chain_id}"
        )
    return EvmSink(
        connect(settings.evm_rpc_url, timeout_s=settings.sink_timeout_s),
        deployment,
        oracle=load_key(settings.evm_oracle_key_file),
        journal=Journal(settings.database_url, timeout_s=settings.database_timeout_s),
        confirmations=settings.evm_confirmations,
        direct_max=settings.evm_direct_max,
        stall_s=settings.evm_stall_s,
        timeout_s=settings.sink_timeout_s,
        priority_fee_wei=round(settings.evm_priority_fee_gwei * 10**9),
    )
