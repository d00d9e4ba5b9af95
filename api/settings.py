"""Every option of `meterproof api`, validated at start, from the same sources as every
other process (`METERPROOF_*`, `.run/stack.env`, the TOML file of `METERPROOF_CONFIG`).

The acceptance rules of submitted readings are not here: the API's in-process worker
reads them as `IngestSettings` from the same sources, so HTTP and MQTT judge alike."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr

from meterproof.certs.identities import API_IDENTITY, INGEST_IDENTITY_RE
from meterproof.certs.layout import PkiLayout
from meterproof.config import DEFAULT_RUN_DIR, Settings, new_share_group
from meterproof.ingest.settings import IngestSettings


class ApiSettings(Settings):
    api_host: str = Field(default="127.0.0.1", description="address the HTTPS listener binds")
    api_port: int = Field(default=8443, ge=0, le=65535, description="HTTPS port (TLS 1.3)")
    api_token_key_file: Path = Field(
        default=DEFAULT_RUN_DIR / "api-token.key",
        description="HS256 key of the access tokens; generated (mode 0600) when missing",
    )
    api_token_ttl_s: int = Field(default=300, ge=30, le=3600, description="access token life")
    api_operator_secret: SecretStr | None = Field(
        default=None,
        description="client secret of the `operator` client; None: no operator tokens",
    )
    api_max_body_bytes: int = Field(
        default=1 << 20, ge=1024, le=64 << 20, description="larger request bodies get 413"
    )
    api_submit_timeout_s: float = Field(
        default=15.0, gt=0, description="how long a submission waits for its commit"
    )
    api_rate_auth_per_min: int = Field(default=10, ge=1, description="per caller")
    api_rate_submission_per_min: int = Field(default=4, ge=1, description="per meter")
    api_rate_status_per_min: int = Field(default=60, ge=1, description="per caller")
    api_rate_analytics_per_min: int = Field(default=20, ge=1, description="per caller")
    api_rate_provider_per_min: int = Field(
        default=100, ge=1, description="seed 003 reading submissions, per provider"
    )
    api_rate_provider_address_per_min: int = Field(
        default=1000, ge=1,
        description="seed 003 reading submissions, per client address (the body's provider"
        " id is unauthenticated until the pipeline verifies it)",
    )  # fmt: skip
    api_submit_max_pending: int = Field(
        default=10_000, ge=1000,
        description="submitted readings waiting for their receipt, at most (at least one"
        " whole batch of 1000); more answer 503 `overloaded` with Retry-After",
    )  # fmt: skip
    api_mqtt_identity: str | None = Field(
        default=None,
        pattern=rf"^{API_IDENTITY}$|{INGEST_IDENTITY_RE.pattern}",
        description=f"who republishes HTTP readings on every broker: `{API_IDENTITY}` or an"
        " ingest worker identity no worker uses; unset: `api` when the PKI has it, else"
        " they are not republished",
    )
    api_republish_max_pending: int = Field(
        default=100_000, ge=1, description="announcements queued while the broker is away"
    )
    api_pages_interval_s: float = Field(
        default=30.0, gt=0, le=3600, description="pause between history page renders once caught up"
    )
    api_pages_grace_s: float = Field(
        default=60.0, ge=0, le=86_400,
        description="a quarter's history page is rendered this long after the quarter ends",
    )  # fmt: skip
    api_pages_batch: int = Field(default=500, ge=1, le=100_000, description="quarters per render")
    api_pages_csv: bool = Field(
        default=True,
        description="render each history page as CSV too (about as much storage again as the"
        " JSON pages); off: CSV history is read row by row",
    )
    api_heap_keep_mib: int = Field(
        default=64,
        ge=0,
        le=2047,  # glibc's trim threshold is a C int of bytes
        description="freed memory kept for the next large answer instead of being returned"
        " to the kernel (glibc only, at most 2047; 0: glibc's defaults)",
    )
    api_metrics_port: int = Field(
        default=9118, ge=0, le=65535, description="/metrics on loopback; 0 disables it"
    )

    def republish_identity(self) -> str | None:
        """`api_mqtt_identity`, else `api` once issued (`certs init` issues it; a PKI made
        before it existed gets it from the next `certs init` or `stack up`)."""
        if self.api_mqtt_identity is not None:
            return self.api_mqtt_identity
        issued = PkiLayout(self.pki_root).service(API_IDENTITY).cert.is_file()
        return API_IDENTITY if issued else None

    def ingest_settings(self) -> IngestSettings:
        """The in-process worker's settings: this process's addresses, the acceptance rules
        from the sources every worker reads. It never subscribes, so without a share group
        a throwaway one stands in."""
        addresses: dict[str, Any] = self.model_dump(include=set(Settings.model_fields))
        addresses["share_group"] = self.share_group or new_share_group()
        return IngestSettings(**addresses, metrics_port=0)

    def token_key(self) -> bytes:
        """The signing key of access tokens, created on first use (0600)."""
        path = self.api_token_key_file
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(secrets.token_urlsafe(48) + "\n")
        return path.read_text(encoding="utf-8").strip().encode()
