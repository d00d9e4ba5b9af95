"""Every command that takes an id, a path or a value, given hostile ones: a clean error
(exit 1 or 2, no traceback, no raw control characters echoed), nothing written outside the
working folder, no SQL run from the value. NUL is left out: an argv cannot carry it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fixtures.isolation import fresh_database

from meterproof.cli.main import main
from meterproof.stack.postgres import PostgresServer

HOSTILE = {
    "sql": "x'; DROP TABLE meters; --",
    "traversal": "../../../../tmp/meterproof-pwned",
    "control": "m\x1b[2J\r\nINFO forged log line\x07",
    "long": "A" * 10_000,
    "unicode": "\u202e\u0430\U0001f600",
}

#: {v} is the hostile value, {db} the test's database URL. Commands whose value is an
#: operator's own path are in PATHS: those may point anywhere, but must fail cleanly.
IDS = [
    "certs issue {v}",
    "certs revoke {v}",
    "certs issue-integrator {v}",
    "certs issue-bulk --count 1 --prefix {v}",
    "meters register {v} --from-pki --database-url {db}",
    "meters register ok-meter --alg EdDSA --public-key key.pem --kid {v} --database-url {db}",
    "meters register ok-meter --alg EdDSA --public-key key.pem --owner-wallet {v}"
    " --database-url {db}",
    "meters show {v} --database-url {db}",
    "meters set-status {v} active --database-url {db}",
    "meters set-status ok-meter {v} --database-url {db}",
    "meters quarantine {v} --reason {v} --database-url {db}",
    "meters rotate-key {v} --alg EdDSA --public-key key.pem --database-url {db}",
    "meters decommission {v} --database-url {db}",
    "ledger proof {v} --database-url {db}",
    "meter run --meter-id {v} --count 1",
    "simulate --meters 1 --readings 1 --alg-mix {v}",
    "db migrate --database-url {v}",
    "db prune --database-url {v}",
    "db prune --retain-days {v} --chunk-rows {v} --database-url {db}",
    "db backup --database-url {v} --out b.dump",
]
#: Free text the registry keeps as given (an AMI label: control characters and over-long
#: values refused, the rest stored verbatim through parameters, never as SQL or a path).
FREE_TEXT = [
    "meters register ok-meter --alg EdDSA --public-key key.pem --serial {v} --database-url {db}",
]
PATHS = [
    "certs --pki-root {v} list",
    "ledger check-proof {v}",
    "ledger verify --database-url {db} --oracle-pub {v}",
    "stack status --run-dir {v}",
    "stack down --run-dir {v}",
    "bridge --config {v} --once",
    "ingest --config {v}",
    "meter run --meter-id m --stack-env {v}",
    "meters register --bulk {v} --database-url {db}",
    "db restore {v} --database-url {db}",
]


def _argv(template: str, value: str, db: str) -> list[str]:
    return [value if w == "{v}" else db if w == "{db}" else w for w in template.split()]


def _tables(db: str) -> int:
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pki) -> Path:
    """A working folder of its own, with an Ed25519 public key to register (so a register
    case is refused for its hostile value, not for the key) and the stack's defaults
    pointing nowhere real."""
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "key.pem").write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    # The CA of its own (a copy of the session's): `certs` commands reach their name
    # checks, and anything a hostile name wrote would land inside this folder or outside it.
    shutil.copytree(pki.ca_dir, work / "pki" / "ca")
    monkeypatch.chdir(work)
    for name in ("METERPROOF_DATABASE_URL", "METERPROOF_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("METERPROOF_PKI_ROOT", str(work / "pki"))
    return work


@pytest.fixture(scope="module")
def unnamed_database_url(postgres: PostgresServer, migrated_template: str) -> Iterator[str]:
    """A migrated database the module's commands are not given: no value can reach it, so
    one serves them all (its table count still shows that no SQL ran)."""
    yield from fresh_database(postgres, migrated_template)


def _database_url(template: str, request: pytest.FixtureRequest) -> str:
    """A database of the test's own when the command is given one ({db}), else the
    module's: cloning one per test was most of this module's time."""
    fixture = "database_url" if "{db}" in template else "unnamed_database_url"
    return str(request.getfixturevalue(fixture))


def _check(
    template: str,
    value_name: str,
    request: pytest.FixtureRequest,
    workdir: Path,
    *,
    may_succeed: bool = False,
) -> str:
    """Runs the command with the hostile value; returns the database it was given."""
    value = HOSTILE[value_name]
    database_url = _database_url(template, request)
    outside = workdir.parent.parent
    before_outside = sorted(outside.rglob("*"))
    tables = _tables(database_url)
    result = CliRunner().invoke(main, _argv(template, value, database_url))
    output = result.output  # stdout and stderr, interleaved
    assert isinstance(result.exception, SystemExit | None), (
        f"escaped {type(result.exception).__name__}: {result.exception!r}\n{output[-1500:]}"
    )
    codes = (0, 1, 2) if may_succeed else (1, 2)
    assert result.exit_code in codes, f"exit {result.exit_code}: {output[-1500:]}"
    assert "Traceback" not in output
    raw = [c for c in ("\x1b", "\x00", "\r") if c in output]
    assert not raw, f"raw control characters echoed: {output[-500:]!r}"
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) <= 4, f"{len(lines)} lines of output for one error: {output[-1500:]}"
    after_outside = sorted(p for p in outside.rglob("*") if workdir not in (p, *p.parents))
    assert after_outside == [p for p in before_outside if workdir not in (p, *p.parents)]
    assert not Path("/tmp/meterproof-pwned").exists()
    assert _tables(database_url) == tables
    return database_url


@pytest.mark.slow
@pytest.mark.parametrize("value_name", list(HOSTILE))
@pytest.mark.parametrize("template", IDS)
def test_hostile_ids_and_values(
    template: str, value_name: str, request: pytest.FixtureRequest, workdir: Path
) -> None:
    _check(template, value_name, request, workdir)


@pytest.mark.slow
@pytest.mark.parametrize("value_name", list(HOSTILE))
@pytest.mark.parametrize("template", FREE_TEXT)
def test_hostile_free_text_is_refused_or_kept_verbatim(
    template: str, value_name: str, request: pytest.FixtureRequest, workdir: Path
) -> None:
    database_url = _check(template, value_name, request, workdir, may_succeed=True)
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT serial FROM meters WHERE meter_id = 'ok-meter'").fetchone()
    assert row is None or row[0] == HOSTILE[value_name], row


@pytest.mark.slow
@pytest.mark.parametrize("value_name", ["traversal", "long", "control"])
@pytest.mark.parametrize("template", PATHS)
def test_hostile_paths(
    template: str, value_name: str, request: pytest.FixtureRequest, workdir: Path
) -> None:
    """An operator's own path may point anywhere (an empty folder is not an error)."""
    _check(template, value_name, request, workdir, may_succeed=True)
