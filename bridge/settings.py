"""Every option of the bridge, validated at start (env `METERPROOF_*`, `.run/stack.env`, or a
TOML file named by `METERPROOF_CONFIG`). docs/anchoring.md explains each one."""

from __future__ import annotations

import os
import socket
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
    sink: Literal["local"] = "local"
    sink_timeout_s: float = Field(default=5.0, gt=0, le=300)
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=60.0, gt=0)

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
