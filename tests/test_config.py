"""Settings: addresses declared once, the sample config in step, sources in their order."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from meterproof.bridge.settings import BridgeSettings
from meterproof.cli.main import main
from meterproof.config import Settings, StackEnv, new_share_group
from meterproof.ingest.settings import IngestSettings

SAMPLE = Path(__file__).resolve().parents[1] / "docs" / "ingest.sample.toml"


def _sample() -> tuple[dict[str, object], set[str]]:
    """The sample's values, and the keys it documents only in a comment (`# key = ...`)."""
    text = SAMPLE.read_text(encoding="utf-8")
    commented = set(re.findall(r"^# ([a-z_]+) = ", text, flags=re.MULTILINE))
    return tomllib.loads(text), commented


def test_the_sample_config_documents_every_worker_option_with_its_default() -> None:
    values, commented = _sample()
    assert set(values) | commented == set(IngestSettings.model_fields)
    for name, value in values.items():
        default = IngestSettings.model_fields[name].default
        assert str(value) == str(default), f"{name}: sample {value!r}, default {default!r}"


@pytest.mark.parametrize("settings", [IngestSettings, BridgeSettings, StackEnv])
def test_addresses_are_declared_once(settings: type[Settings]) -> None:
    """A process's settings inherit the addresses; none declares its own default again
    (the ingest worker only makes the share group required)."""
    own = set(vars(settings).get("__annotations__", {}))
    assert own & set(Settings.model_fields) <= {"share_group", "redis_url"}
    for name in set(Settings.model_fields) - {"share_group", "redis_url"}:
        assert settings.model_fields[name].default == Settings.model_fields[name].default


def test_the_stack_env_file_is_found_when_settings_are_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = new_share_group()
    env_file = tmp_path / "stack.env"
    StackEnv.defaults(mqtt_port=18883, share_group=group).write(env_file)
    base = {"database_url": "postgresql://x@127.0.0.1/x"}
    with pytest.raises(ValueError, match="share_group"):  # the tests point it nowhere
        IngestSettings.model_validate(base)

    monkeypatch.setenv("METERPROOF_STACK_ENV", str(env_file))
    settings = IngestSettings.model_validate(base)
    assert (settings.share_group, settings.mqtt_port) == (group, 18883)
    monkeypatch.setenv("METERPROOF_MQTT_PORT", "28883")  # the environment wins over the file
    assert IngestSettings.model_validate(base).mqtt_port == 28883
    assert IngestSettings.model_validate({**base, "mqtt_port": 3}).mqtt_port == 3


def test_the_toml_file_is_the_weakest_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "bridge.toml"
    toml.write_text('epoch_seconds = 60\ndatabase_url = "postgresql://toml@127.0.0.1/x"\n')
    monkeypatch.setenv("METERPROOF_CONFIG", str(toml))
    monkeypatch.setenv("METERPROOF_DATABASE_URL", "postgresql://env@127.0.0.1/x")
    settings = BridgeSettings()
    assert settings.epoch_seconds == 60
    assert settings.database_url == "postgresql://env@127.0.0.1/x"


def test_a_broker_list_set_empty_means_the_one_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A supervisor that writes every setting, unset ones as empty strings, starts a worker
    on mqtt_host:mqtt_port; a malformed list is refused by name."""
    monkeypatch.setenv("METERPROOF_MQTT_BROKERS", "")
    monkeypatch.setenv("METERPROOF_MQTT_ADMIN_PORTS", "")
    env = StackEnv(mqtt_host="10.0.0.7", mqtt_port=18883)
    assert env.brokers() == (("10.0.0.7", 18883),)
    assert env.admin_ports() == (env.mqtt_admin_port,)
    monkeypatch.setenv("METERPROOF_MQTT_BROKERS", "a:1,b")
    with pytest.raises(ValueError, match="mqtt_brokers"):
        StackEnv()


@pytest.mark.parametrize(
    ("name", "value", "line"),
    [
        (
            "METERPROOF_MQTT_PORT",
            "abc",
            "Error: invalid setting mqtt_port: Input should be a valid",
        ),
        ("METERPROOF_CONFIG", "{toml}", "Error: METERPROOF_CONFIG '{toml}': Invalid value"),
        ("METERPROOF_CONFIG", "{missing}", "Error: METERPROOF_CONFIG names '{missing}': no such"),
    ],
)
def test_a_bad_setting_or_config_file_is_one_line_in_every_command(
    tmp_path: Path, name: str, value: str, line: str
) -> None:
    """Commands that read only the stack's addresses (`db`, `meters`, `simulate`) refuse a
    bad value as the services do, and a config file that is missing or not TOML is never
    a traceback nor silently ignored."""
    toml = tmp_path / "bad.toml"
    toml.write_text("epoch_seconds = [\n")
    paths = {"toml": str(toml), "missing": str(tmp_path / "nope.toml")}
    env = {"METERPROOF_STACK_ENV": str(tmp_path / "none.env"), name: value.format(**paths)}
    result = CliRunner().invoke(main, ["db", "migrate"], env=env)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(line.format(**paths)), result.output
    assert result.output.count("\n") == 1


@pytest.mark.parametrize("name", ["database_url", "database_read_url"])
def test_a_database_url_libpq_cannot_parse_is_refused_by_name(name: str) -> None:
    """A typo is found when the settings are built, not as an unreachable database later."""
    with pytest.raises(ValueError, match=f'{name}\n.*missing "=" after "not"'):
        Settings(**{name: "not a url"})
    assert getattr(Settings(**{name: "host=db.example port=5433"}), name).endswith("5433")
