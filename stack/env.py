"""The running stack's addresses, written by `meterproof stack up` to `.run/stack.env`.

Every other command (ingest, bridge, simulate, certs revoke, tests) reads the same file,
or the same `METERPROOF_*` variables from the environment, so nobody guesses a port.
"""

from __future__ import annotations

import os
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

    def to_env_lines(self) -> list[str]:
        """`KEY=value` lines that a shell can source and pydantic-settings can read."""
        return [
            f"METERPROOF_{name.upper()}={value}"
            for name, value in self.model_dump(mode="json").items()
        ]

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(self.to_env_lines()) + "\n", encoding="utf-8")
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
