"""The running stack's addresses, written by `meterproof stack up` to `.run/stack.env`.

Every other command (ingest, bridge, simulate, certs revoke, tests) reads the same file,
or the same `METERPROOF_*` variables from the environment, so nobody guesses a port.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_RUN_DIR = Path(".run")
STACK_ENV_FILE = DEFAULT_RUN_DIR / "stack.env"
#: What a share-group name may contain: MQTT forbids / + # in it, and 16 characters of
#: this alphabet are ~96 bits, more than a meter can guess at ~740 TLS handshakes/s.
SHARE_GROUP_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"


def new_share_group() -> str:
    """A secret name for the ingest workers' shared subscription (see `StackEnv.share_group`)."""
    return secrets.token_urlsafe(24)


class StackEnv(BaseSettings):
    """Addresses and credentials of one running stack (loopback by default)."""

    model_config = SettingsConfigDict(
        env_prefix="METERPROOF_", env_file=STACK_ENV_FILE, extra="ignore", frozen=True
    )

    run_dir: Path = Field(default=DEFAULT_RUN_DIR, description="state of the local stack")
    pki_root: Path = Field(default=Path("certs/out"), description="operator PKI folder")
    mqtt_host: str = Field(default="127.0.0.1", description="broker host for TLS clients")
    mqtt_port: int = Field(default=8883, ge=1, le=65535, description="mutual-TLS listener")
    mqtt_admin_port: int = Field(
        default=1884, ge=1, le=65535, description="loopback-only plain listener, admin only"
    )
    database_url: str = Field(
        default="postgresql://meterproof@127.0.0.1:5432/meterproof",
        description="PostgreSQL connection URL",
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis URL")
    share_group: str | None = Field(
        default=None,
        pattern=SHARE_GROUP_PATTERN,
        description="secret name of the ingest workers' shared subscription: Mosquitto "
        "2.0 lets any client join a shared subscription it can name, and takes readings "
        "away from the workers for it (mosquitto/meterproof.acl.tmpl); never give it to meters",
    )

    def to_env_lines(self) -> list[str]:
        """`KEY=value` lines that a shell can source and pydantic-settings can read."""
        return [
            f"METERPROOF_{name.upper()}={value}"
            for name, value in self.model_dump(mode="json").items()
            if value is not None
        ]

    def write(self, path: Path) -> None:
        """Mode 0600: the file holds the share-group secret."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("\n".join(self.to_env_lines()) + "\n")
        tmp.chmod(0o600)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path | None = None) -> StackEnv:
        """Environment variables win over the file; the file wins over defaults."""
        return cls(_env_file=path or STACK_ENV_FILE)

    @classmethod
    def read(cls, path: Path) -> StackEnv:
        """Exactly what `write` wrote, ignoring the environment.

        `stack status` and `stack down` describe the stack of one run dir, not whatever
        stack a shell happened to `source`.
        """
        values: dict[str, object] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition("=")
            if sep and key.startswith("METERPROOF_"):
                values[key.removeprefix("METERPROOF_").lower()] = value
        return cls.defaults(**values)

    @classmethod
    def defaults(cls, **values: object) -> StackEnv:
        """The documented defaults updated with `values`, ignoring the environment.

        Every field is passed explicitly, the only way to keep pydantic-settings from
        filling the others in from METERPROOF_* variables.
        """
        return cls.model_validate(
            {name: field.default for name, field in cls.model_fields.items()} | values
        )


class ProcessSettings(BaseSettings):
    """The base of every long-running process's settings (ingest, bridge): arguments win,
    then `METERPROOF_*` variables, then `.run/stack.env`, then the TOML file named by
    `METERPROOF_CONFIG`. Unknown keys are ignored, so one file can serve every process."""

    model_config = SettingsConfigDict(
        env_prefix="METERPROOF_", env_file=STACK_ENV_FILE, extra="ignore", frozen=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        toml = os.environ.get("METERPROOF_CONFIG")
        if toml:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml)))
        return tuple(sources)
