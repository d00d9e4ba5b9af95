"""Where every meterproof process finds its stack, with each address and default declared
once, in the settings base every process builds on.

Sources, strongest first: arguments, `METERPROOF_*` variables, the stack env file
(`.run/stack.env`, written by `meterproof stack up`; `METERPROOF_STACK_ENV` names
another: a file that does not exist means no stack), then the TOML file named by
`METERPROOF_CONFIG`. Unknown keys are ignored, so one file serves every process.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from pathlib import Path
from typing import Final

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from meterproof.errors import MeterproofError, first_line

DEFAULT_RUN_DIR: Final = Path(".run")
STACK_ENV_FILE: Final = DEFAULT_RUN_DIR / "stack.env"
DEFAULT_PKI_ROOT: Final = Path("certs/out")
DEFAULT_DATABASE_URL: Final = "postgresql://meterproof@127.0.0.1:5432/meterproof"
DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
#: What a share-group name may contain: MQTT forbids / + # in it, and 16 characters of
#: this alphabet are ~96 bits, more than a meter can guess at ~740 TLS handshakes/s.
SHARE_GROUP_PATTERN: Final = r"^[A-Za-z0-9_-]{16,64}$"
#: `host:port` pairs separated by commas (hosts without colons: no IPv6 literals here).
BROKER_LIST_PATTERN: Final = r"^[^,:\s]+:\d{1,5}(,[^,:\s]+:\d{1,5})*$"

#: Where a broker listens: (host, port).
BrokerAddress = tuple[str, int]


def stack_env_file() -> Path:
    """The stack env file every command reads: `METERPROOF_STACK_ENV`, else the default."""
    return Path(os.environ.get("METERPROOF_STACK_ENV") or STACK_ENV_FILE)


def parse_brokers(value: str) -> tuple[BrokerAddress, ...]:
    """`host:port,host:port` (BROKER_LIST_PATTERN) as addresses, every port checked."""
    addresses = tuple((host, int(port)) for host, port in (i.split(":") for i in value.split(",")))
    if not all(1 <= port <= 65535 for _, port in addresses):
        raise ValueError(f"a port of {value!r} is outside 1..65535")
    return addresses


def format_brokers(addresses: tuple[BrokerAddress, ...]) -> str:
    return ",".join(f"{host}:{port}" for host, port in addresses)


class SettingsError(MeterproofError):
    """A setting, or the TOML file of `METERPROOF_CONFIG`, is invalid: the process refuses
    to start, with one line naming it."""


def libpq_parsable(url: str) -> str:
    """`url` if libpq can parse it, else ValueError with libpq's reason: a typo is bad
    input found at the start, not an unreachable database found later."""
    try:
        conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise ValueError(first_line(exc)) from None
    return url


def invalid_settings(exc: ValidationError) -> str:
    """The first error as one line naming the setting (a check across settings names none)."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    said = first["msg"].removeprefix("Value error, ")
    return f"invalid setting {where}: {said}" if where else f"invalid settings: {said}"


def new_share_group() -> str:
    """A secret name for the ingest workers' shared subscription (see `share_group`)."""
    return secrets.token_urlsafe(24)


class Settings(BaseSettings):
    """The base of every process's settings: where the broker, database, Redis and PKI
    are (loopback defaults, declared once), read from the sources above."""

    model_config = SettingsConfigDict(env_prefix="METERPROOF_", extra="ignore", frozen=True)

    pki_root: Path = Field(default=DEFAULT_PKI_ROOT, description="operator PKI folder")
    mqtt_host: str = Field(default="127.0.0.1", description="broker host for TLS clients")
    mqtt_port: int = Field(default=8883, ge=1, le=65535, description="mutual-TLS listener")
    mqtt_brokers: str | None = Field(
        default=None,
        pattern=BROKER_LIST_PATTERN,
        description="ordered `host:port,host:port` list of brokers that share one CA, CRL "
        "and ACL (`stack up --ha`): meters fail over along it, workers subscribe on each; "
        "unset, mqtt_host:mqtt_port is the only broker",
    )
    database_url: str = Field(default=DEFAULT_DATABASE_URL, description="PostgreSQL URL")
    database_read_url: str | None = Field(
        default=None,
        description="PostgreSQL URL of the reads that may lag (the API's history and "
        "rollups): a standby, with the primary named too and "
        "`target_session_attrs=prefer-standby` so they fall back to it (`stack up --ha` "
        "sets it); unset, database_url serves them",
    )
    redis_url: str | None = Field(
        default=DEFAULT_REDIS_URL, description="Redis URL; None disables the replay fast path"
    )
    database_timeout_s: float = Field(
        default=30.0,
        ge=1,
        le=3600,
        description="a database that answers nothing this long (a host lost without a "
        "reset, a stalled disk) is given up: the worker's transaction, key lookup and "
        "registry and consent listens, the bridge's transactions and the API's reads and "
        "requests go on over a new connection or fail as on a lost one (db/silence.py)",
    )
    share_group: str | None = Field(
        default=None,
        pattern=SHARE_GROUP_PATTERN,
        description="secret name of the ingest workers' shared subscription: Mosquitto "
        "2.0 lets any client join a shared subscription it can name, and takes readings "
        "away from the workers for it (mosquitto/meterproof.acl.tmpl); never give it to meters",
    )

    @field_validator("mqtt_brokers", "mqtt_admin_ports", mode="before", check_fields=False)
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`METERPROOF_MQTT_BROKERS=` (set but empty) means the one broker, as unset does;
        the same for StackEnv's `mqtt_admin_ports`."""
        return None if value == "" else value

    @field_validator("database_url", "database_read_url")
    @classmethod
    def _libpq_parsable(cls, value: str | None) -> str | None:
        return None if value is None else libpq_parsable(value)

    @field_validator("mqtt_brokers")
    @classmethod
    def _ports_in_range(cls, value: str | None) -> str | None:
        if value:
            parse_brokers(value)
        return value

    def brokers(self) -> tuple[BrokerAddress, ...]:
        """Every broker, in the order clients try them: `mqtt_brokers`, else the one."""
        if not self.mqtt_brokers:
            return ((self.mqtt_host, self.mqtt_port),)
        return parse_brokers(self.mqtt_brokers)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The stack env file is looked up when settings are built, not when this module is
        imported, so a test or a command can point it elsewhere (or nowhere); the TOML
        file is the weakest source."""
        if isinstance(dotenv_settings, DotEnvSettingsSource) and dotenv_settings.env_file is None:
            dotenv_settings = DotEnvSettingsSource(settings_cls, env_file=stack_env_file())
        sources = [init_settings, env_settings, dotenv_settings]
        toml = os.environ.get("METERPROOF_CONFIG")
        if toml:
            sources.append(_toml_source(settings_cls, Path(toml)))
        return tuple(sources)


def _toml_source(settings_cls: type[BaseSettings], path: Path) -> TomlConfigSettingsSource:
    """pydantic-settings skips a missing file and lets a syntax error escape as a
    traceback: a typo in the name would run on defaults unnoticed."""
    if not path.is_file():
        raise SettingsError(f"METERPROOF_CONFIG names {str(path)[:200]!r}: no such file")
    try:
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"METERPROOF_CONFIG {str(path)[:200]!r}: {exc}") from None


class StackEnv(Settings):
    """The addresses of one running stack, as `meterproof stack up` records them."""

    run_dir: Path = Field(default=DEFAULT_RUN_DIR, description="state of the local stack")
    mqtt_admin_port: int = Field(
        default=1884, ge=1, le=65535, description="loopback-only plain listener, admin only"
    )
    redis_url: str = Field(default=DEFAULT_REDIS_URL, description="Redis URL")
    mqtt_admin_ports: str | None = Field(
        default=None,
        pattern=r"^\d{1,5}(,\d{1,5})*$",
        description="admin listener of each broker of `mqtt_brokers`, in the same order; "
        "unset, mqtt_admin_port is the only one",
    )

    def admin_ports(self) -> tuple[int, ...]:
        """The admin port of each broker of `brokers()`, in the same order."""
        if not self.mqtt_admin_ports:
            return (self.mqtt_admin_port,)
        return tuple(int(port) for port in self.mqtt_admin_ports.split(","))

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
        """Environment variables win over the file; the file wins over defaults. An invalid
        value is one line naming the setting, not a traceback, in every command."""
        try:
            return cls() if path is None else cls(_env_file=path)
        except ValidationError as exc:
            raise SettingsError(invalid_settings(exc)) from None

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
