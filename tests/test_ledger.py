"""`meterproof ledger ...` against a real anchored ledger: verify finds every kind of
tampering and names the entry and reading, proofs check out offline with any RFC 6962
implementation, and the listings and errors read well."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from bridge_harness import T0, Clock, in_process, make_fleet, query
from click.testing import CliRunner, Result

from meterproof.bridge.entry import Header, seal
from meterproof.bridge.mint import Mint
from meterproof.bridge.oracle import Oracle, describe, load_oracle
from meterproof.certs.layout import PkiLayout
from meterproof.cli.main import COMMANDS, main
from meterproof.schemas.signatures import Ed25519Public, generate_private_key
from meterproof.stack.process import free_port

ATTACKER_KEY = generate_private_key("EdDSA")


@dataclass(frozen=True)
class Ledger:
    url: str
    pki: PkiLayout
    oracle: Oracle
    a: str
    b: str

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(
            main,
            list(args),
            env={"METERPROOF_PKI_ROOT": str(self.pki.root)},
            catch_exceptions=False,
        )

    def hash_of(self, meter_id: str, seq: int) -> str:
        (digest,), *_ = query(
            self.url,
            "SELECT reading_hash FROM reading_log WHERE meter_id = %s AND seq = %s",
            (meter_id, seq),
        )
        return bytes(digest).hex()


@pytest.fixture
def ledger(database_url: str, make_meter_id: Callable[[], str], pki: PkiLayout) -> Ledger:
    """Three anchored entries (epochs 0-2 of meters a and b), then one open batch (epoch 5)."""
    oracle = load_oracle(pki.oracle_key)
    fleet, (a, b) = make_fleet(database_url, make_meter_id, ["w-a", None])
    fleet.store(
        [(m, s, T0 + 1000 * (s - 1) + 100 * k, 0, 100 * k + 10 * s) for s in (1, 2, 3)
         for k, m in enumerate((a, b), start=1)]
    )  # fmt: skip
    runner = in_process(database_url, oracle, Clock(T0 + 3000))
    runner.run_once()
    fleet.store([(a, 4, T0 + 5000, 0, 200)])
    runner.run_once()
    runner.close()
    return Ledger(database_url, pki, oracle, a, b)


def test_verify_says_ok_with_the_figures(ledger: Ledger) -> None:
    result = ledger.run("ledger", "verify", "--database-url", ledger.url)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK 3 entries, 6 anchored readings (7 rehashed)")
    assert "0.04 GRID minted" in result.output
    assert describe(ledger.oracle.public_key) in result.output


TAMPERING = {
    # name: (SQL run as the superuser with triggers off, expected words in the report)
    "edit_an_optional_field": (
        "UPDATE readings SET power_w = 1 WHERE meter_id = %(a)s AND seq = 2",
        "entry 2, reading {a}/2 ({h}): its stored fields hash to",
    ),
    "edit_registers": (
        "UPDATE readings SET export_wh = export_wh + 1 WHERE meter_id = %(a)s AND seq = 2",
        "entry 2, reading {a}/2 ({h}): its ts or registers in reading_log differ",
    ),
    "edit_both_copies_of_a_reading": (
        "UPDATE readings SET export_wh = 9 WHERE meter_id = %(a)s AND seq = 2;"
        " UPDATE reading_log SET export_wh = 9 WHERE meter_id = %(a)s AND seq = 2",
        "entry 2, reading {a}/2 ({h}): its stored fields hash to",
    ),
    "delete_a_reading": (
        "DELETE FROM readings WHERE meter_id = %(a)s AND seq = 2",
        "entry 2, reading {a}/2 ({h}): is missing from the readings table (deleted)",
    ),
    "delete_a_reading_everywhere": (
        "DELETE FROM readings WHERE meter_id = %(a)s AND seq = 2;"
        " DELETE FROM reading_log WHERE meter_id = %(a)s AND seq = 2",
        "entry 2: 1 readings are claimed by this batch, the header says 2",
    ),
    "move_a_reading_to_another_batch": (
        "UPDATE reading_log SET batch_id = 3 WHERE meter_id = %(a)s AND seq = 2",
        "entry 2: 1 readings are claimed by this batch, the header says 2",
    ),
    "unlog_a_reading": (
        "DELETE FROM reading_log WHERE meter_id = %(a)s AND seq = 4",
        "reading {a}/4 ",
    ),
    "edit_an_entry": (
        "UPDATE ledger_entries SET reading_count = 3 WHERE seq = 2",
        "entry 2: the row's columns differ from its signed header (edited)",
    ),
    "reorder_entries": (
        "UPDATE ledger_entries SET seq = 100 WHERE seq = 1;"
        " UPDATE ledger_entries SET seq = 1 WHERE seq = 2;"
        " UPDATE ledger_entries SET seq = 2 WHERE seq = 100",
        "entry 1: holds the signed header of entry 2 (reordered)",
    ),
    "delete_an_entry": (
        "DELETE FROM ledger_mints WHERE entry = 2; DELETE FROM ledger_entries WHERE seq = 2",
        "entry 2: the ledger jumps from entry 1 to 3",
    ),
    "edit_a_mint": (
        "UPDATE ledger_mints SET export_delta_wh = export_delta_wh + 1,"
        " grid_units = grid_units + 1000000000000000 WHERE entry = 2",
        "entry 2: the mint list does not hash to the header's mint_hash",
    ),
    "edit_a_balance": (
        "UPDATE ledger_balances SET grid_units = grid_units + 1",
        "wallet w-a: balance",
    ),
}


@pytest.mark.parametrize("name", sorted(TAMPERING))
def test_verify_names_the_first_discrepancy(ledger: Ledger, name: str) -> None:
    sql, expected = TAMPERING[name]
    with psycopg.connect(ledger.url, autocommit=True) as conn, conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")  # an attacker: triggers off
        for statement in sql.split(";"):
            conn.execute(statement.replace("%(a)s", "%s"), [ledger.a] * statement.count("%(a)s"))
    result = ledger.run("ledger", "verify", "--database-url", ledger.url)
    assert result.exit_code == 1
    want = expected.format(a=ledger.a, h=ledger.hash_of(ledger.a, 2) if "{h}" in expected else "")
    assert result.output.startswith("DISCREPANCY ")
    assert want in result.output, result.output
    assert result.output.count("\n") == 1


def _re_signed_by(ledger: Ledger, key_holder: Oracle) -> None:
    """Rewrite entry 3 with a valid header and signature from someone else's key."""
    (header_bytes,), *_ = query(ledger.url, "SELECT header FROM ledger_entries WHERE seq = 3")
    old = Header.decode(bytes(header_bytes))
    mints = [
        Mint(m, w, int(e), int(i))
        for m, w, e, i in query(
            ledger.url,
            "SELECT meter_id, wallet, export_delta_wh, import_delta_wh FROM ledger_mints"
            ' WHERE entry = 3 ORDER BY meter_id COLLATE "C"',
        )
    ]
    forged = seal(
        batch=old.batch, epoch=old.epoch, epoch_ms=old.epoch_ms, prev_hash=old.prev_hash,
        merkle_root=old.merkle_root, reading_count=old.reading_count, mints=mints,
        oracle=key_holder.key, oracle_key=key_holder.public_key,
    )  # fmt: skip
    assert forged.header.mint_hash == old.mint_hash
    with psycopg.connect(ledger.url, autocommit=True) as conn, conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(
            "UPDATE ledger_entries SET oracle_key = %s, header = %s,"
            " signature = %s, entry_hash = %s WHERE seq = 3",
            (
                forged.header.oracle_key,
                forged.header.encode(),
                forged.signature,
                forged.header.entry_hash,
            ),
        )


def test_verify_refuses_entries_signed_by_another_key(ledger: Ledger) -> None:
    public = ATTACKER_KEY.public_key()
    assert isinstance(public, Ed25519Public)
    attacker = Oracle(ATTACKER_KEY, public.raw)
    _re_signed_by(ledger, attacker)
    result = ledger.run("ledger", "verify", "--database-url", ledger.url)
    assert result.exit_code == 1
    assert f"entry 3: signed by the untrusted key ed25519:{attacker.public_key.hex()}" in (
        result.output
    )
    # and against the attacker's key, the first entry is the untrusted one
    pem = ledger.pki.root / "attacker.pub.pem"
    pem.write_text(public.pem())
    result = ledger.run("ledger", "verify", "--database-url", ledger.url, "--oracle-pub", str(pem))
    assert "entry 1: signed by the untrusted key" in result.output


# ---------------------------------------------------------------------------------------
# proofs
# ---------------------------------------------------------------------------------------


def rfc9162_root_from_path(leaf: bytes, index: int, size: int, path: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.3.2, written out again so the proof is checked independently."""
    fn, sn = index, size - 1
    r = hashlib.sha256(b"\x00" + leaf).digest()
    for p in path:
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn >> 1, sn >> 1
    assert sn == 0
    return r


def test_proof_checks_offline_and_by_an_independent_rfc6962_check(
    ledger: Ledger, tmp_path: Path
) -> None:
    digest = ledger.hash_of(ledger.a, 2)
    out = tmp_path / "proof.json"
    result = ledger.run("ledger", "proof", digest, "--database-url", ledger.url, "-o", str(out))
    assert result.exit_code == 0, result.output
    proof = json.loads(out.read_text())
    assert proof["reading_hash"] == digest
    assert proof["tree_size"] == 2
    assert proof["entry"]["batch"] == 2
    root = rfc9162_root_from_path(
        bytes.fromhex(digest),
        proof["leaf_index"],
        proof["tree_size"],
        [bytes.fromhex(p) for p in proof["audit_path"]],
    )
    assert root.hex() == proof["merkle_root"] == proof["entry"]["merkle_root"]
    header = bytes.fromhex(proof["entry"]["header"])
    assert hashlib.sha256(header).hexdigest() == proof["entry"]["entry_hash"]
    (entry_hash,), *_ = query(ledger.url, "SELECT entry_hash FROM ledger_entries WHERE seq = 2")
    assert bytes(entry_hash).hex() == proof["entry"]["entry_hash"] == proof["receipt"]["entry_hash"]

    result = ledger.run("ledger", "check-proof", str(out))
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"OK leaf {proof['leaf_index']} of 2 in batch 2; signed by")
    assert "(the trusted key)" in result.output


def _longer_path(p: dict[str, Any]) -> None:
    p["audit_path"].append("00" * 32)


def _other_leaf(p: dict[str, Any]) -> None:
    p["leaf_index"] = 1 - p["leaf_index"]


def _more_readings(p: dict[str, Any]) -> None:
    p["entry"]["reading_count"] = 3


def _zero_signature(p: dict[str, Any]) -> None:
    p["entry"]["signature"] = "00" * 64


def _no_size(p: dict[str, Any]) -> None:
    del p["tree_size"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_longer_path, "audit path"),
        (_other_leaf, "audit path"),
        (_more_readings, "do not encode its fields"),
        (_zero_signature, "signature"),
        (_no_size, "not a meterproof inclusion proof"),
    ],
)
def test_a_tampered_proof_is_invalid(
    ledger: Ledger, tmp_path: Path, change: Callable[[dict[str, Any]], None], reason: str
) -> None:
    out = tmp_path / "proof.json"
    digest = ledger.hash_of(ledger.b, 1)
    made = ledger.run("ledger", "proof", digest, "--database-url", ledger.url, "-o", str(out))
    assert made.exit_code == 0
    proof = json.loads(out.read_text())
    change(proof)
    out.write_text(json.dumps(proof))
    result = ledger.run("ledger", "check-proof", str(out))
    assert result.exit_code == 1
    assert result.output.startswith("INVALID ")
    assert reason in result.output


def test_a_proof_from_another_oracle_is_invalid_when_the_key_is_pinned(
    ledger: Ledger, tmp_path: Path
) -> None:
    out = tmp_path / "proof.json"
    digest = ledger.hash_of(ledger.a, 1)
    ledger.run("ledger", "proof", digest, "--database-url", ledger.url, "-o", str(out))
    pem = tmp_path / "other.pub.pem"
    pem.write_text(ATTACKER_KEY.public_key().pem())
    result = ledger.run("ledger", "check-proof", str(out), "--oracle-pub", str(pem))
    assert result.exit_code == 1
    assert "not the trusted key" in result.output


def test_proof_errors_are_one_line(ledger: Ledger) -> None:
    unknown = ledger.run("ledger", "proof", "ab" * 32, "--database-url", ledger.url)
    assert unknown.exit_code == 1
    assert unknown.stderr == f"Error: reading {'ab' * 32} is not stored\n"
    still_open = ledger.run(
        "ledger", "proof", ledger.hash_of(ledger.a, 4), "--database-url", ledger.url
    )
    assert still_open.exit_code == 1
    assert "is in batch 4" in still_open.stderr
    assert "still open" in still_open.stderr
    malformed = ledger.run("ledger", "proof", "xyz", "--database-url", ledger.url)
    assert malformed.exit_code == 2
    down = f"postgresql://meterproof@127.0.0.1:{free_port()}/nothing"
    for args in (("verify",), ("balances",), ("entries",), ("proof", "ab" * 32)):
        result = ledger.run("ledger", *args, "--database-url", down)
        assert result.exit_code == 1
        assert result.stderr.startswith("Error: database unreachable: ")
        assert result.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------
# listings and help
# ---------------------------------------------------------------------------------------


def test_balances_and_entries(ledger: Ledger) -> None:
    table = ledger.run("ledger", "balances", "--database-url", ledger.url)
    assert table.exit_code == 0
    lines = table.output.splitlines()
    assert lines[1].split() == ["w-a", "0.02", "3"]
    assert lines[2].split() == ["(no", "wallet)", "0.02", "3"]
    as_json = json.loads(
        ledger.run("ledger", "balances", "--json", "--database-url", ledger.url).output
    )
    assert as_json[0] == {
        "wallet": "w-a",
        "grid_units": str(2 * 10**16),
        "grid": "0.02",
        "last_entry": 3,
    }

    entries = ledger.run("ledger", "entries", "--database-url", ledger.url)
    assert entries.exit_code == 0
    assert entries.output.startswith(
        f"oracle key (published): {describe(ledger.oracle.public_key)}\n"
    )
    assert "2026-01-01 00:00:02" in entries.output
    assert "bridge: 1 batch(es) open" in entries.output
    view = json.loads(
        ledger.run(
            "ledger", "entries", "--json", "--limit", "2", "--database-url", ledger.url
        ).output
    )
    assert [e["batch"] for e in view["entries"]] == [2, 3]
    assert view["entries"][0]["mints"] == sorted(
        [
            {
                "meter_id": ledger.a,
                "wallet": "w-a",
                "export_delta_wh": 10,
                "import_delta_wh": 0,
                "grid_units": str(10**16),
                "grid": "0.01",
            },
            {
                "meter_id": ledger.b,
                "wallet": None,
                "export_delta_wh": 10,
                "import_delta_wh": 0,
                "grid_units": str(10**16),
                "grid": "0.01",
            },
        ],
        key=lambda m: m["meter_id"],
    )
    assert view["bridge"] == {"open": 1}


def test_every_command_has_help() -> None:
    runner = CliRunner()
    assert COMMANDS["ledger"] == "meterproof.bridge.cli:ledger"
    for args in (
        ["bridge"],
        ["ledger"],
        ["ledger", "verify"],
        ["ledger", "proof"],
        ["ledger", "check-proof"],
        ["ledger", "balances"],
        ["ledger", "entries"],
    ):
        result = runner.invoke(main, [*args, "--help"])
        assert result.exit_code == 0, args
        assert "Usage: " in result.output
