"""The registry repository and `meterproof meters`, against the session PostgreSQL and PKI."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from click.testing import CliRunner, Result
from consent_harness import Ed25519Wallet, link
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from structlog.testing import capture_logs

from meterproof.certs.bulk import issue_bulk, new_meter_ids, write_bulk_csv
from meterproof.certs.crl import read_revoked
from meterproof.certs.identities import issue_device, load_identity
from meterproof.certs.layout import PkiLayout
from meterproof.registry import repository, wallets
from meterproof.registry.accounts import AccountId
from meterproof.registry.cli import meters
from meterproof.registry.errors import (
    InvalidInputError,
    RefusedError,
    StateError,
    UnknownMeterError,
)
from meterproof.registry.model import (
    MeterStatus,
    NewKey,
    NewMeter,
    SecurityLevel,
    Severity,
    default_kid,
)
from meterproof.registry.telemetry import REFUSALS
from meterproof.schemas.signatures import generate_private_key
from meterproof.stack.process import free_port


def _pem(alg: str = "EdDSA") -> str:
    return generate_private_key(alg, rsa_bits=2048).public_key().pem()


def _key_file(tmp_path: Path, alg: str = "EdDSA") -> Path:
    path = tmp_path / f"{alg}-{datetime.now(UTC).timestamp()}.pub.pem"
    path.write_text(_pem(alg), encoding="ascii")
    return path


@pytest.fixture
def cli(database_url: str, pki: PkiLayout) -> Callable[..., Result]:
    """Runs `meterproof meters ARGS` against this test's database and the session PKI."""

    def run(*args: str) -> Result:
        env = {"METERPROOF_DATABASE_URL": database_url, "METERPROOF_PKI_ROOT": str(pki.root)}
        return CliRunner().invoke(meters, list(args), env=env)

    return run


@pytest.fixture
def conn(database_url: str) -> Any:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


def _count(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def _one_line_error(result: Result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("Error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_python_enums_match_the_sql_enums(conn: psycopg.Connection[Any]) -> None:
    for sql_type, enum in (
        ("meter_status", MeterStatus),
        ("security_level", SecurityLevel),
        ("security_severity", Severity),
    ):
        row = conn.execute(f"SELECT enum_range(NULL::{sql_type})::text[]").fetchone()
        assert row == ([member.value for member in enum],)


def test_register_from_pki_files(
    cli: Callable[..., Result], conn: psycopg.Connection[Any], pki: PkiLayout, meter_id: str
) -> None:
    files = issue_device(pki, meter_id, alg="ES256")
    identity = load_identity(files)
    result = cli(
        "register", meter_id, "--from-pki", "--owner-wallet", "9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGY",
        "--serial", "SM2025-ENG-001", "--manufacturer", "SmartGrid Technologies",
        "--location", '{"room": "E101", "gps_coordinates": {"latitude": 13.7, "longitude": 100.5}}',
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    meter = repository.fetch_meter(conn, meter_id)
    assert meter is not None
    assert meter.status is MeterStatus.ACTIVE
    assert meter.accepts_readings
    assert (meter.cert_fingerprint, meter.cert_serial) == (
        identity.sha256_fingerprint,
        identity.serial,
    )
    assert meter.location == {
        "room": "E101",
        "gps_coordinates": {"latitude": 13.7, "longitude": 100.5},
    }
    [key] = repository.active_keys(conn, meter_id)
    pem = files.signing_pub.read_text(encoding="ascii")
    assert (key.alg, key.public_key_pem, key.kid) == ("ES256", pem, default_kid(pem))
    assert key.valid_to is None
    events = repository.recent_events(conn, meter_id)
    assert [(e.type, e.severity) for e in events] == [("registered", Severity.INFO)]


def test_register_with_an_explicit_key_and_refuse_a_second_registration(
    cli: Callable[..., Result], tmp_path: Path, meter_id: str
) -> None:
    key = _key_file(tmp_path, "PS256")
    args = ("register", meter_id, "--public-key", str(key), "--alg", "PS256", "--kid", "k1")
    assert cli(*args).exit_code == 0
    assert "already registered" in _one_line_error(cli(*args), 1)


def test_register_refuses_a_key_that_does_not_fit_its_algorithm(
    cli: Callable[..., Result], conn: psycopg.Connection[Any], tmp_path: Path, meter_id: str
) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    rsa1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    cases = {
        "EdDSA": _key_file(tmp_path, "ES256"),
        "ES256": _write(tmp_path / "p384.pem", p384),
        "RS256": _write(tmp_path / "rsa1024.pem", rsa1024),
    }
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PUBLIC KEY-----\n\xff\x00\n-----END PUBLIC KEY-----\n")
    cases["PS256"] = garbage
    for alg, path in cases.items():
        error = _one_line_error(
            cli("register", meter_id, "--public-key", str(path), "--alg", alg), 2
        )
        assert f"bad {alg} public key" in error
    missing = cli("register", meter_id, "--public-key", str(tmp_path / "nope"), "--alg", "EdDSA")
    assert "cannot read" in _one_line_error(missing, 2)
    assert _count(conn, "meters") == 0


def _write(path: Path, key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> Path:
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.mark.slow
def test_bulk_registers_a_certs_issue_bulk_csv_of_1000_meters(
    cli: Callable[..., Result], conn: psycopg.Connection[Any], pki: PkiLayout, tmp_path: Path
) -> None:
    devices = issue_bulk(pki, new_meter_ids(1000, prefix="bulk-"))
    csv_path = tmp_path / "fleet.csv"
    write_bulk_csv(devices, csv_path)
    result = cli("register", "--bulk", str(csv_path), "--security-level", "high")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("registered 1000 meters")
    assert _count(conn, "meters") == 1000
    assert _count(conn, "meter_keys") == 1000
    assert _count(conn, "security_events") == 1000
    sample = devices[500]
    meter = repository.fetch_meter(conn, sample.record.name)
    assert meter is not None
    assert meter.security_level is SecurityLevel.HIGH
    assert meter.cert_serial == sample.record.serial
    [key] = repository.active_keys(conn, sample.record.name)
    assert key.public_key_pem == sample.public_key_pem


def test_bulk_reports_the_first_bad_row_and_writes_nothing(
    cli: Callable[..., Result], conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    good = _pem().replace("\n", "\\n")
    rows = [
        "meter_id,alg,public_key_pem,owner_wallet",
        f"a1,EdDSA,{good},w1",
        f'a2,EdDSA,"{_pem()}",w2',  # a quoted PEM keeps its newlines
        f"a3,EdDSA,{good.replace('A', 'B')},w3",
        "a4,EdDSA,junk,w4",
    ]
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    error = _one_line_error(cli("register", "--bulk", str(path)), 2)
    assert "line 7: bad EdDSA public key" in error  # the quoted PEM spans lines 3-6
    assert _count(conn, "meters") == 0

    head = "meter_id,alg,public_key_pem\n"
    for content, expected in (
        ("meter_id,alg\n", "header lacks column 'public_key_pem'"),
        ("meter_id,alg,public_key_pem,colour\n", "unknown column 'colour'"),
        (f"{head}b1,EdDSA,{good}\nb1,EdDSA,{good}\n", "line 3: meter id 'b1' repeats line 2"),
        (f"{head}../x,EdDSA,{good}\n", "line 2: invalid meter id '../x'"),
        (f"{head}c1,EdDSA,{good},extra\n", "line 2: more cells than columns"),
        (head, "has no rows"),
    ):
        path.write_text(content, encoding="utf-8")
        assert expected in _one_line_error(cli("register", "--bulk", str(path)), 2)
    path.write_bytes(b"meter_id,alg,public_key_pem\n\xff\xfe,EdDSA,x\n")
    assert "codec can't decode" in _one_line_error(cli("register", "--bulk", str(path)), 2)
    assert _count(conn, "meters") == 0


def test_bulk_with_an_already_registered_meter_writes_nothing(
    cli: Callable[..., Result], conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    repository.register(conn, [NewMeter(meter_id="taken", key=NewKey.parse("EdDSA", _pem()))])
    good = _pem().replace("\n", "\\n")
    path = tmp_path / "fleet.csv"
    path.write_text(f"meter_id,alg,public_key_pem\nfree,EdDSA,{good}\ntaken,EdDSA,{good}\n")
    assert "'taken' is already registered" in _one_line_error(
        cli("register", "--bulk", str(path)), 1
    )
    assert _count(conn, "meters") == 1


def test_list_and_show_as_json(cli: Callable[..., Result], tmp_path: Path) -> None:
    key = str(_key_file(tmp_path))
    for meter_id, level in (("b", "high"), ("a", "basic"), ("c", "high")):
        assert cli("register", meter_id, "--public-key", key, "--alg", "EdDSA", "--kid", meter_id,
                   "--security-level", level).exit_code == 0  # fmt: skip
    assert cli("set-status", "c", "inactive").exit_code == 0
    listed = json.loads(cli("list", "--json").output)
    assert [m["meter_id"] for m in listed] == ["a", "b", "c"]
    high = json.loads(
        cli("list", "--json", "--security-level", "high", "--status", "active").output
    )
    assert [m["meter_id"] for m in high] == ["b"]
    assert len(json.loads(cli("list", "--json", "--limit", "2").output)) == 2
    assert cli("list").output.splitlines()[0].split()[:3] == ["a", "active", "basic"]

    shown = json.loads(cli("show", "c", "--json").output)
    assert shown["meter_id"] == "c"
    assert shown["status"] == "inactive"
    assert [k["kid"] for k in shown["keys"]] == ["c"]
    assert [e["type"] for e in shown["events"]] == ["status_changed", "registered"]
    assert shown["events"][0]["detail"] == {"from": "active", "to": "inactive", "reason": None}
    text = cli("show", "c").output
    assert "status:             inactive" in text


def test_set_status_and_quarantine_log_security_events(
    cli: Callable[..., Result], conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    key = str(_key_file(tmp_path))
    assert cli("register", "m", "--public-key", key, "--alg", "EdDSA").exit_code == 0
    result = cli("set-status", "m", "maintenance", "--reason", "meter swap")
    assert result.output == "m: active -> maintenance\n"
    assert cli("set-status", "m", "maintenance").output == "m: already maintenance\n"
    assert cli("quarantine", "m", "--reason", "seq reuse seen by an operator").exit_code == 0
    events = repository.recent_events(conn, "m")
    assert [(e.type, e.severity, e.detail.get("to")) for e in events] == [
        ("quarantined", Severity.CRITICAL, "quarantined"),
        ("status_changed", Severity.INFO, "maintenance"),
        ("registered", Severity.INFO, None),
    ]
    meter = repository.fetch_meter(conn, "m")
    assert meter is not None
    assert not meter.accepts_readings


def test_rotate_key_keeps_the_old_key_valid_for_the_overlap(
    cli: Callable[..., Result], conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    assert cli("register", "m", "--public-key", str(_key_file(tmp_path)), "--alg", "EdDSA",
               "--kid", "old").exit_code == 0  # fmt: skip
    new = str(_key_file(tmp_path, "ES256"))
    result = cli("rotate-key", "m", "--public-key", new, "--alg", "ES256", "--kid", "new",
                 "--overlap-hours", "6")  # fmt: skip
    assert result.output == "m: added ES256 key new; retiring old in 6 h\n"
    keys = {k.kid: k for k in repository.active_keys(conn, "m")}
    assert set(keys) == {"old", "new"}
    now = datetime.now(UTC)
    old_end = keys["old"].valid_to
    assert old_end is not None
    assert timedelta(hours=6) - timedelta(minutes=1) < old_end - now <= timedelta(hours=6)
    later = now + timedelta(hours=6, seconds=1)
    assert [keys["old"].valid_at(t) for t in (now, later)] == [True, False]
    assert [keys["new"].valid_at(t) for t in (now, later)] == [True, True]
    assert "already has a key 'new'" in _one_line_error(
        cli("rotate-key", "m", "--public-key", new, "--alg", "ES256", "--kid", "new"), 2
    )
    rotation = repository.rotate_key(
        conn, "m", NewKey.parse("EdDSA", _pem(), kid="now"), overlap=timedelta(0)
    )
    assert rotation.retiring == ("new", "old")
    assert [k.kid for k in repository.active_keys(conn, "m")] == ["now"]
    assert [k.kid for k in repository.all_keys(conn, "m")] == ["now", "new", "old"]
    assert repository.recent_events(conn, "m")[0].detail["retiring"] == ["new", "old"]


def test_decommission_revokes_the_certificate_and_is_final(
    cli: Callable[..., Result], conn: psycopg.Connection[Any], pki: PkiLayout, tmp_path: Path,
    meter_id: str,
) -> None:  # fmt: skip
    issue_device(pki, meter_id)
    assert cli("register", meter_id, "--from-pki").exit_code == 0
    no_stack = str(tmp_path / "stack.env")
    result = cli("decommission", meter_id, "--reason", "removed", "--stack-env", no_stack)
    assert result.exit_code == 0, result.output
    assert "decommissioned" in result.output
    assert "no running stack" in result.output
    serial = load_identity(pki.device(meter_id)).serial
    assert serial in {entry.serial for entry in read_revoked(pki)}
    again = cli("decommission", meter_id, "--stack-env", no_stack)
    assert "already decommissioned" in again.output
    assert "already revoked" in again.output
    assert "is decommissioned" in _one_line_error(cli("set-status", meter_id, "active"), 1)
    with pytest.raises(StateError):
        repository.rotate_key(conn, meter_id, NewKey.parse("EdDSA", _pem()), overlap=timedelta(0))


def test_changing_a_decommissioned_meter_is_a_recorded_refusal_with_a_reason_code(
    cli: Callable[..., Result], conn: psycopg.Connection[Any], meter_id: str
) -> None:
    """Like every other registry refusal: a stable reason code in the error, the security
    event, the log line and the metric; the CLI still ends with exit 1 (state)."""
    repository.register(conn, [NewMeter(meter_id, NewKey.parse("EdDSA", _pem()))])
    repository.set_status(conn, meter_id, MeterStatus.DECOMMISSIONED, reason="removed")
    counted = {
        action: REFUSALS.labels(action=action, reason="meter_decommissioned")
        for action in ("set_status", "rotate_key")
    }
    before = {action: metric._value.get() for action, metric in counted.items()}
    with capture_logs() as logs:
        with pytest.raises(StateError) as quarantined:
            repository.set_status(conn, meter_id, MeterStatus.QUARANTINED)
        with pytest.raises(StateError) as rotated:
            repository.rotate_key(
                conn, meter_id, NewKey.parse("EdDSA", _pem()), overlap=timedelta(0)
            )
    assert (quarantined.value.code, rotated.value.code) == ("meter_decommissioned",) * 2
    assert [(e["event"], e["reason"], e["meter_id"]) for e in logs] == [
        ("set_status_refused", "meter_decommissioned", meter_id),
        ("rotate_key_refused", "meter_decommissioned", meter_id),
    ]
    assert {a: m._value.get() - before[a] for a, m in counted.items()} == {
        "set_status": 1,
        "rotate_key": 1,
    }
    assert _refusal_events(conn, meter_id) == [
        ("set_status_refused", "meter_decommissioned"),
        ("rotate_key_refused", "meter_decommissioned"),
    ]
    error = _one_line_error(cli("set-status", meter_id, "active"), 1)
    assert "meter_decommissioned: " in error
    meter = repository.fetch_meter(conn, meter_id)
    assert meter is not None
    assert meter.status is MeterStatus.DECOMMISSIONED


def _refusal_events(conn: psycopg.Connection[Any], meter_id: str) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT type, detail->>'reason' FROM security_events WHERE meter_id = %s"
        " AND type LIKE '%%_refused' ORDER BY id",
        (meter_id,),
    ).fetchall()
    return [(str(kind), str(reason)) for kind, reason in rows]


def test_set_status_refuses_decommissioned_and_names_decommission(
    cli: Callable[..., Result], conn: psycopg.Connection[Any], pki: PkiLayout, meter_id: str
) -> None:
    """`set-status M decommissioned` made the status final but left the certificate
    valid, so the meter could still log in to the broker: only `decommission` revokes."""
    issue_device(pki, meter_id)
    assert cli("register", meter_id, "--from-pki").exit_code == 0
    counted = REFUSALS.labels(action="set_status", reason="decommission_without_revocation")
    before = counted._value.get()
    with capture_logs() as logs:
        result = cli("set-status", meter_id, "decommissioned", "--reason", "removed")
    error = _one_line_error(result, 2)
    assert "decommission_without_revocation" in error
    assert f"`meterproof meters decommission {meter_id}`" in error
    assert counted._value.get() == before + 1
    assert [(e["event"], e["reason"]) for e in logs] == [
        ("set_status_refused", "decommission_without_revocation")
    ]
    assert _refusal_events(conn, meter_id) == [
        ("set_status_refused", "decommission_without_revocation")
    ]
    meter = repository.fetch_meter(conn, meter_id)
    assert meter is not None
    assert meter.status is MeterStatus.ACTIVE
    assert load_identity(pki.device(meter_id)).serial not in {e.serial for e in read_revoked(pki)}


def test_register_refuses_a_decommissioned_status(
    cli: Callable[..., Result], conn: psycopg.Connection[Any], pki: PkiLayout, meter_id: str
) -> None:
    """A meter registered decommissioned would keep a valid certificate: that status is
    reached only through `decommission`, which revokes it (bulk CSVs take --status too)."""
    issue_device(pki, meter_id)
    result = cli("register", meter_id, "--from-pki", "--status", "decommissioned")
    error = _one_line_error(result, 2)
    assert "invalid status 'decommissioned'" in error
    assert "decommissioned" not in error.split("one of", 1)[1]
    assert repository.fetch_meter(conn, meter_id) is None


def test_decommission_without_a_certificate_only_changes_the_status(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    assert (
        cli("register", "m", "--public-key", str(_key_file(tmp_path)), "--alg", "EdDSA").exit_code
        == 0
    )
    result = cli("decommission", "m", "--stack-env", str(tmp_path / "absent"))
    assert result.exit_code == 0, result.output
    assert "nothing to revoke" in result.output


HOSTILE_IDS = [
    "m'; DROP TABLE meters;--",
    "../../etc/passwd",
    "a/b",
    ".",
    "..",
    "line\nbreak",
    "nul\x00byte",
    "esc\x1b[31m",
    "é",
    "x" * 65,
    "",
    "$share/ingest/#",
]


@pytest.mark.parametrize("bad_id", HOSTILE_IDS)
def test_hostile_meter_ids_are_refused_everywhere(
    cli: Callable[..., Result], conn: psycopg.Connection[Any], tmp_path: Path, bad_id: str
) -> None:
    key = str(_key_file(tmp_path))
    for args in (
        ("register", bad_id, "--public-key", key, "--alg", "EdDSA"),
        ("register", bad_id, "--from-pki"),
        ("show", bad_id),
        ("set-status", bad_id, "active"),
        ("quarantine", bad_id),
        ("rotate-key", bad_id, "--public-key", key, "--alg", "EdDSA"),
        ("decommission", bad_id),
    ):
        assert "invalid meter id" in _one_line_error(cli(*args), 2)
    with pytest.raises(InvalidInputError):
        NewMeter(meter_id=bad_id, key=NewKey.parse("EdDSA", _pem()))
    assert _count(conn, "meters") == 0


def test_hostile_values_are_stored_verbatim_or_refused(
    cli: Callable[..., Result], conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    key = str(_key_file(tmp_path))
    sql_text = "O'Brien\"; DROP TABLE meters;-- \\ %s %(x)s {}"
    result = cli("register", "m", "--public-key", key, "--alg", "EdDSA", "--serial", sql_text,
                 "--model", "Ωμέγα ☀", "--location", json.dumps({"note": sql_text}))  # fmt: skip
    assert result.exit_code == 0, result.output
    meter = repository.fetch_meter(conn, "m")
    assert meter is not None
    assert (meter.serial, meter.model, meter.location) == (sql_text, "Ωμέγα ☀", {"note": sql_text})

    refused = [
        (("--serial", "a\nb"), "control character U+000A"),
        (("--manufacturer", "\x1b[2J"), "control character U+001B"),
        (("--model", "zero\u200bwidth"), "control character U+200B"),
        (("--firmware-version", "x" * 10_000), "must be 1 to 256 characters"),
        (("--owner-wallet", "w; rm -rf /"), "invalid owner wallet"),
        (("--kid", "k\x00"), "invalid kid"),
        (("--location", "[1, 2]"), "location must be a JSON object"),
        (("--location", '{"a": "\\u0000"}'), "NUL"),
        (("--location", '{"a": NaN}'), "not valid JSON"),
        (("--location", '{"gps_coordinates": {"latitude": 91, "longitude": 0}}'), "out of range"),
        (("--location", "{" * 5000), "longer than 4096 bytes"),
        (("--status", "active' OR '1'='1"), "invalid status"),
    ]
    for extra, expected in refused:
        args = ("register", "n", "--public-key", key, "--alg", "EdDSA", *extra)
        assert expected in _one_line_error(cli(*args), 2)
    assert "control character" in _one_line_error(
        cli("set-status", "m", "inactive", "--reason", "a\rb"), 2
    )
    assert _count(conn, "meters") == 1


def test_cli_errors_are_one_line_with_a_nonzero_exit(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    assert "no meter 'ghost' is registered" in _one_line_error(cli("show", "ghost"), 1)
    assert "no meter 'ghost'" in _one_line_error(cli("set-status", "ghost", "active"), 1)
    assert "no identity.json for meter 'ghost'" in _one_line_error(
        cli("register", "ghost", "--from-pki"), 2
    )
    assert "give --from-pki" in _one_line_error(cli("register", "ghost"), 2)
    assert "--bulk takes only" in _one_line_error(
        cli("register", "ghost", "--bulk", str(tmp_path / "x.csv")), 2
    )
    unreachable = f"postgresql://meterproof:secret@127.0.0.1:{free_port()}/meterproof"
    error = _one_line_error(cli("list", "--database-url", unreachable), 1)
    assert "database unreachable at 127.0.0.1" in error
    assert "secret" not in error
    assert "Usage" in cli("--help").output
    assert "overlap" in cli("rotate-key", "--help").output


def test_repository_reads_of_unknown_meters_are_empty(conn: psycopg.Connection[Any]) -> None:
    assert repository.fetch_meter(conn, "nobody") is None
    assert repository.active_keys(conn, "nobody") == []
    assert repository.recent_events(conn, "nobody") == []
    with pytest.raises(UnknownMeterError):
        repository.set_status(conn, "nobody", MeterStatus.ACTIVE)


def test_record_security_event_about_any_identity(conn: psycopg.Connection[Any]) -> None:
    event_id = repository.record_security_event(
        conn,
        event_type="authentication_failure",
        severity=Severity.HIGH,
        meter_id="never-registered",
        detail={"tls_identity": "x'; --"},
    )
    [event] = repository.recent_events(conn, "never-registered")
    assert (event.id, event.type, event.detail) == (
        event_id,
        "authentication_failure",
        {"tls_identity": "x'; --"},
    )
    with pytest.raises(InvalidInputError):
        repository.record_security_event(conn, event_type="Bad Type", severity=Severity.LOW)


def test_a_new_key_is_stored_in_canonical_form() -> None:
    pem = _pem("ES256")
    crlf = NewKey.parse("ES256", pem.replace("\n", "\r\n").encode())
    assert crlf.public_key_pem == pem
    with pytest.raises(InvalidInputError, match="canonical"):
        NewKey("ES256", pem.replace("\n", "\r\n"), "k")  # type: ignore[arg-type]


ZERO_ACCOUNT = "eip155:1337:0x0000000000000000000000000000000000000000"


def test_the_evm_zero_address_is_refused_as_an_owner_wallet(
    cli: Callable[..., Result], conn: psycopg.Connection[Any], tmp_path: Path, meter_id: str
) -> None:
    """GRID (an ERC-20) refuses to mint to the zero address, so a meter registered with it
    would stop anchoring on chain: refused at registration, one CSV row as one flag."""
    key = str(_key_file(tmp_path))
    args = ("register", meter_id, "--public-key", key, "--alg", "EdDSA")
    for wallet in (ZERO_ACCOUNT, ZERO_ACCOUNT.replace("0x", "0X"), "eip155:1:0x" + "0" * 40):
        assert "(zero_wallet)" in _one_line_error(cli(*args, "--owner-wallet", wallet), 2)
    bulk = tmp_path / "bulk.csv"
    pem = _pem().replace("\n", "\\n")
    bulk.write_text(
        f"meter_id,alg,public_key_pem,owner_wallet\n{meter_id},EdDSA,{pem},{ZERO_ACCOUNT}\n"
    )
    assert "line 2" in _one_line_error(cli("register", "--bulk", str(bulk)), 2)
    with pytest.raises(InvalidInputError, match="zero_wallet"):
        NewMeter(meter_id, NewKey.parse("EdDSA", _pem()), owner_wallet=ZERO_ACCOUNT)
    assert _count(conn, "meters") == 0
    assert cli(*args, "--owner-wallet", ZERO_ACCOUNT.replace("0x0", "0x1")).exit_code == 0


def test_the_evm_zero_address_cannot_be_linked_to_a_meter(
    conn: psycopg.Connection[Any], meter_id: str
) -> None:
    """Refused before a challenge is issued and again at the link, with its reason code
    recorded as a security event and counted."""
    repository.register(conn, [NewMeter(meter_id, NewKey.parse("EdDSA", _pem()))])
    zero = AccountId.parse(ZERO_ACCOUNT)
    counted = REFUSALS.labels(action="link_wallet", reason="zero_wallet")
    before = counted._value.get()
    with pytest.raises(RefusedError) as issued:
        wallets.issue_link_challenge(conn, meter_id, zero)
    with pytest.raises(RefusedError) as linked:
        wallets.link_wallet(conn, meter_id=meter_id, account=zero, challenge_id=uuid4(),
                            wallet_signature="0x" + "00" * 65)  # fmt: skip
    assert (issued.value.code, linked.value.code) == ("zero_wallet", "zero_wallet")
    assert counted._value.get() == before + 2
    assert _count(conn, "wallet_challenges") == 0
    events = conn.execute(
        "SELECT type, detail->>'reason' FROM security_events WHERE meter_id = %s"
        " AND type LIKE '%%_refused' ORDER BY id",
        (meter_id,),
    ).fetchall()
    assert events == [("link_wallet_refused", "zero_wallet")] * 2
    owner = conn.execute("SELECT owner_wallet FROM meters WHERE meter_id = %s", (meter_id,))
    assert owner.fetchone() == (None,)


def test_unlink_wallet_refuses_a_bad_reason_as_bad_input(
    cli: Callable[..., Result], conn: psycopg.Connection[Any], meter_id: str
) -> None:
    """The reason is free text an operator typed: checked like every other one (exit 2,
    one line), not left to the database's domain check (exit 1, "database error")."""
    meter_key = generate_private_key("EdDSA")
    repository.register(
        conn, [NewMeter(meter_id, NewKey.parse("EdDSA", meter_key.public_key().pem()))]
    )
    wallet = Ed25519Wallet.new()
    link(conn, meter_id, meter_key, wallet)
    for reason in ("", "sold\x1b[2J"):
        error = _one_line_error(cli("unlink-wallet", meter_id, "--reason", reason), 2)
        assert "reason" in error
    assert wallets.current_link(conn, meter_id) is not None
    done = cli("unlink-wallet", meter_id, "--reason", "sold the house")
    assert done.exit_code == 0, done.output
    assert wallets.current_link(conn, meter_id) is None
