"""Every option of the bridge, validated at start (env `METERPROOF_*`, `.run/stack.env`, or a
TOML file named by `METERPROOF_CONFIG`). docs/anchoring.md explains each one."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from meterproof.config import Settings
from meterproof.schemas import topics


class BridgeSettings(Settings):
    """The addresses (database_url, pki_root, mqtt_host, mqtt_port) come from
    `Settings`; everything else is the bridge's own."""

    # epochs
    epoch_seconds: int = Field(default=900, ge=1, le=86_400)
    seal_delay_s: float = Field(default=30.0, ge=0, le=3600)
    claim_interval_s: float = Field(default=5.0, gt=0, le=600)

    # anchoring
    sink: Literal["local", "evm"] = "local"
    sink_timeout_s: float = Field(default=5.0, gt=0, le=300)
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=60.0, gt=0)
    recheck_interval_s: float = Field(
        default=30.0,
        ge=0,
        le=86_400,
        description="how often anchored batches are looked up"
        " again in the sink (a chain reorg can drop them); 0 never",
    )
    recheck_batches: int = Field(default=16, ge=1, le=10_000)

    # the evm sink (docs/anchoring.md section 12)
    evm_rpc_url: str = "http://127.0.0.1:8545"
    evm_chain_id: int = Field(default=1337, ge=1, description="refused if the node differs")
    evm_confirmations: int = Field(default=2, ge=1, le=1000)
    evm_oracle_key_file: Path = Field(
        default=Path(".run/evm/oracle.key"), description="0x private key of the oracle account"
    )
    evm_contracts_file: Path = Field(
        default=Path(".run/evm/contracts.json"), description="written by `chain deploy`"
    )
    evm_direct_max: int = Field(
        default=20,
        ge=0,
        le=500,
        description="at most this many wallets minted directly in"
        " the anchoring transaction; larger batches go to the claim tree",
    )
    evm_stall_s: float = Field(
        default=60.0, gt=0, description="a sent transaction not mined after this is replaced"
    )
    evm_priority_fee_gwei: float = Field(default=1.0, ge=0, le=10_000)

    # the epoch summary
    summary_topic: str = Field(default=topics.LEDGER_EPOCHS, pattern=r"^ledger/[^#+]+$")
    mqtt_client_id: str = Field(
        default_factory=lambda: f"bridge-{socket.gethostname()}-{os.getpid()}",
        description="unique per process: nothing is kept in the broker session",
    )

    # telemetry
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(
        default=9100, ge=0, le=65535, description="/metrics, /healthz, /readyz; 0 turns them off"
    )

    @model_validator(mode="after")
    def _coherent(self) -> BridgeSettings:
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s must be at least retry_initial_s")
        return self

    @property
    def epoch_ms(self) -> int:
        return self.epoch_seconds * 1000
