"""Every option of an ingest worker, validated at start (env `METERPROOF_*`, `.run/stack.env`,
or a TOML file named by `METERPROOF_CONFIG`). `docs/ingest.sample.toml` explains each one."""

from __future__ import annotations

from pydantic import Field, model_validator

from meterproof.certs.identities import INGEST_IDENTITY_RE
from meterproof.config import SHARE_GROUP_PATTERN, Settings
from meterproof.schemas.reading import MAX_AGE_MS, MAX_FUTURE_MS


class IngestSettings(Settings):
    """The addresses (mqtt_host, mqtt_port, pki_root, database_url, redis_url) come from
    `Settings`; everything else is the worker's own."""

    # the MQTT session
    identity: str = Field(
        default="ingest-0",
        pattern=INGEST_IDENTITY_RE.pattern,
        description="this worker's certificate under pki_root, also its client id",
    )
    share_group: str = Field(
        pattern=SHARE_GROUP_PATTERN,
        description="secret, no default: a client that can name the group takes readings",
    )
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=60, le=0xFFFFFFFF)
    receive_maximum: int = Field(default=4000, ge=20, le=65535)
    publish_window: int = Field(default=1000, ge=1, le=65535)
    broker_lost_exit_s: float = Field(default=60.0, gt=0)
    broker_silent_s: float = Field(
        default=10.0,
        ge=1,
        le=300,
        description="a broker that answers nothing this long while the worker's publish "
        "window to it is full (its machine paused or cut off) has its link cut; with "
        "several brokers, what was waiting for it is dropped (the meters republish)",
    )
    read_pause_ms: int = Field(
        default=5,
        ge=0,
        le=100,
        description="after a read that finds the link busy, wait this long before the next; 0 off",
    )

    # following the load (ingest.follow)
    follow_load: bool = Field(
        default=False,
        description="take readings only while the group needs this worker; needs redis_url",
    )
    follow_join_busy: float = Field(
        default=0.6, ge=0, description="a follower joins an anchor busy at least this share"
    )
    follow_leave_busy: float = Field(
        default=0.6, ge=0, description="and leaves when all subscribed are less busy together"
    )
    follow_leave_after_s: float = Field(default=30.0, ge=0)
    follow_tick_s: float = Field(default=1.0, gt=0, le=60)

    # batching and backpressure
    batch_max_size: int = Field(default=1000, ge=1, le=50_000)
    batch_linger_ms: int = Field(default=25, ge=0, le=10_000)
    retry_initial_s: float = Field(default=0.2, gt=0)
    retry_max_s: float = Field(default=5.0, gt=0)

    # acceptance rules (docs/spec/reading-v1.md section 9)
    max_future_s: int = Field(default=MAX_FUTURE_MS // 1000, ge=0)
    max_age_s: int = Field(default=MAX_AGE_MS // 1000, gt=0)
    rate_window_s: int = Field(default=60, gt=0)
    rate_max_readings: int = Field(default=60, ge=1)
    quarantine_failures: int = Field(default=5, ge=1)
    quarantine_window_s: int = Field(default=600, gt=0)

    # caches
    key_cache_ttl_s: float = Field(
        default=3600.0,
        gt=0,
        description="bounds a missed registry notification; longer than a reporting interval",
    )
    replay_ttl_s: int = Field(default=900, ge=1)
    replay_marks_max: int = Field(
        default=1_000_000,
        ge=0,
        description="meters whose highest seq is kept to skip Redis for new readings; 0 off",
    )

    # telemetry
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9108, ge=0, le=65535, description="0 disables /metrics")

    @property
    def client_id(self) -> str:
        """The broker replaces a client's id with its certificate CN
        (use_username_as_clientid), so the session is named by the identity."""
        return self.identity

    @model_validator(mode="after")
    def _coherent(self) -> IngestSettings:
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s must be at least retry_initial_s")
        if self.follow_load and not self.redis_url:
            raise ValueError("follow_load needs redis_url: the workers share their load there")
        return self
