"""Every command that takes an id, a path or a value, given hostile ones: a clean error
(exit 1 or 2, no traceback, no raw control characters echoed), nothing written outside the
working folder, no SQL run from the value. NUL is left out: an argv cannot carry it."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from meterproof.cli.main import main

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
    "meters register ok-meter --alg EdDSA --public-key key.pem --serial {v} --database-url {db}",
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
    """A working folder of its own, with a public key file to register and the stack's
    defaults pointing nowhere real."""
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "key.pem").write_bytes(
        next(iter(pki.root.glob("**/signing-key.pub.pem")), pki.ca_cert).read_bytes()
    )
    monkeypatch.chdir(work)
    for name in ("METERPROOF_DATABASE_URL", "METERPROOF_PKI_ROOT", "METERPROOF_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return work


def _check(
    template: str, value_name: str, database_url: str, workdir: Path, *, may_succeed: bool = False
) -> None:
    value = HOSTILE[value_name]
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


@pytest.mark.slow
@pytest.mark.parametrize("value_name", list(HOSTILE))
@pytest.mark.parametrize("template", IDS)
def test_hostile_ids_and_values(
    template: str, value_name: str, database_url: str, workdir: Path
) -> None:
    _check(template, value_name, database_url, workdir)


@pytest.mark.slow
@pytest.mark.parametrize("value_name", ["traversal", "long", "control"])
@pytest.mark.parametrize("template", PATHS)
def test_hostile_paths(template: str, value_name: str, database_url: str, workdir: Path) -> None:
    """An operator's own path may point anywhere (an empty folder is not an error)."""
    _check(template, value_name, database_url, workdir, may_succeed=True)
