"""Pairing a P1 reader with its owner's wallet by a one-time code (registry/pairing.py,
`meterproof p1 pair`), against a real PostgreSQL and a real reader process: the code
finds the reader, the reader signs the link document, the wallet still has to sign, and
unknown, used and expired codes are refused, recorded and counted."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from consent_harness import EvmWallet, meter_kid
from ingest_harness import provision
from prometheus_client import REGISTRY

from meterproof.certs.layout import PkiLayout
from meterproof.config import StackEnv
from meterproof.registry import pairing, wallets
from meterproof.registry.accounts import AccountId
from meterproof.registry.errors import RefusedError
from meterproof.schemas.reading import b64url, b64url_decode
from meterproof.schemas.signatures import PrivateKey

Conn = psycopg.Connection[Any]
CODE = re.compile(rb"pairing code: ([0-9A-Z]{4}-[0-9A-Z]{4})")


@pytest.fixture
def conn(database_url: str) -> Iterator[Conn]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def reader_key(pki: PkiLayout, database_url: str, meter_id: str) -> PrivateKey:
    return provision(pki, database_url, meter_id)


def _refusals(action: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "meterproof_access_refusals_total", {"action": action, "reason": reason}
    )
    return value or 0.0


def _recorded(conn: Conn, action: str) -> list[str]:
    rows = conn.execute(
        "SELECT detail->>'reason' FROM security_events WHERE type = %s ORDER BY id",
        (f"{action}_refused",),
    ).fetchall()
    return [r[0] for r in rows]


def _refused(
    conn: Conn, code: str, attempt: Callable[[], object], action: str = "pair_reader"
) -> None:
    before = _refusals(action, code)
    with pytest.raises(RefusedError) as caught:
        attempt()
    assert caught.value.code == code, caught.value
    assert _refusals(action, code) == before + 1
    assert _recorded(conn, action)[-1] == code


def _offer(conn: Conn, meter_id: str, key: PrivateKey, ttl: timedelta) -> pairing.Offer:
    """A reader's offer, made in the test: what `p1 pair` does before it shows the code."""
    offer = pairing.make_offer(meter_id, ttl=ttl)
    pairing.register_offer(
        conn,
        offer.document,
        kid=meter_kid(conn, meter_id),
        signature=b64url(key.sign(offer.document.encode())),
    )
    return offer


class PairProcess:
    """`meterproof p1 pair` in a child process: the code on stdout, the log on stderr."""

    def __init__(
        self, tmp_path: Path, pki: PkiLayout, database_url: str, meter_id: str, valid_for: int
    ) -> None:
        env_file = tmp_path / "stack.env"
        StackEnv(run_dir=tmp_path, pki_root=pki.root, database_url=database_url).write(env_file)
        self.log = tmp_path / "pair.log"
        argv = [sys.executable, "-P", "-m", "meterproof", "p1", "pair", "--meter-id", meter_id,
                "--stack-env", str(env_file), "--valid-for", str(valid_for)]  # fmt: skip
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log)

    def code(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = CODE.search(line)
        assert found, (line, self.log.read_text())
        return found[1].decode()

    def finish(self) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=60)
        return self.proc.returncode, out.decode() + self.log.read_text()


def test_a_reader_pairs_by_its_code_and_the_wallet_still_signs(
    tmp_path: Path, pki: PkiLayout, database_url: str, meter_id: str, reader_key: PrivateKey,
    conn: Conn,
) -> None:  # fmt: skip
    reader = PairProcess(tmp_path, pki, database_url, meter_id, valid_for=120)
    code = reader.code()
    owner, thief = EvmWallet.new(), EvmWallet.new()

    challenge = pairing.claim(conn, code.lower(), owner.account)  # typed as read: any case
    assert f"meter: {meter_id}\nwallet: {owner.account}\n" in challenge.document
    status, output = reader.finish()
    assert status == 0, output
    assert f"signed the link to {owner.account}" in output
    assert '"p1.pairing_code"' in output
    assert code in output
    assert '"p1.pairing_signed"' in output

    # The code is spent; a second entry (the thief's, or the owner's again) is refused.
    _refused(conn, "pairing_code_used", lambda: pairing.claim(conn, code, thief.account))
    # The reader's signature alone links nothing: the wallet named must sign.
    _refused(
        conn,
        "bad_wallet_signature",
        lambda: wallets.link_wallet(
            conn,
            meter_id=meter_id,
            account=owner.account,
            challenge_id=challenge.id,
            wallet_signature=thief.sign(challenge.document),
        ),
        action="link_wallet",
    )
    assert wallets.current_link(conn, meter_id) is None

    link = wallets.link_wallet(
        conn,
        meter_id=meter_id,
        account=owner.account,
        challenge_id=challenge.id,
        wallet_signature=owner.sign(challenge.document),
    )
    assert link.account == str(owner.account)
    kid, signature = conn.execute(
        "SELECT l.meter_kid, l.meter_signature FROM wallet_links l"
        " JOIN pairing_codes p ON p.challenge = l.challenge WHERE l.meter_id = %s",
        (meter_id,),
    ).fetchone() or (None, None)
    assert kid == meter_kid(conn, meter_id)
    assert reader_key.public_key().verify(b64url_decode(signature), challenge.document.encode())


def test_a_code_nobody_enters_expires_on_the_reader(
    tmp_path: Path, pki: PkiLayout, database_url: str, meter_id: str, reader_key: PrivateKey,
    conn: Conn,
) -> None:  # fmt: skip
    reader = PairProcess(tmp_path, pki, database_url, meter_id, valid_for=5)
    code = reader.code()
    status, output = reader.finish()
    assert status == 1, output
    assert "pairing ended: pairing_code_expired" in output
    assert '"p1.pairing_refused"' in output
    assert '"reason": "pairing_code_expired"' in output
    wallet = EvmWallet.new()
    _refused(conn, "pairing_code_expired", lambda: pairing.claim(conn, code, wallet.account))


def test_unknown_used_and_expired_codes_are_refused_with_their_reasons(
    conn: Conn, meter_id: str, reader_key: PrivateKey
) -> None:
    owner = EvmWallet.new()
    _refused(conn, "pairing_code_unknown", lambda: pairing.claim(conn, "ZZZZ-ZZZZ", owner.account))

    short = _offer(conn, meter_id, reader_key, timedelta(seconds=2))
    time.sleep(2.5)
    _refused(conn, "pairing_code_expired", lambda: pairing.claim(conn, short.code, owner.account))

    offer = _offer(conn, meter_id, reader_key, timedelta(minutes=5))
    # Entered for another meter id: refused as unknown, and the code is not spent.
    wrong = f"{meter_id}-other"
    _refused(
        conn,
        "pairing_code_unknown",
        lambda: pairing.claim(conn, offer.code, owner.account, meter_id=wrong),
    )
    challenge = pairing.claim(conn, offer.shown, owner.account, meter_id=meter_id)
    # Claimed but not yet signed by the reader: the wallet's signature is not enough.
    _refused(
        conn,
        "pairing_not_signed",
        lambda: wallets.link_wallet(
            conn,
            meter_id=meter_id,
            account=owner.account,
            challenge_id=challenge.id,
            wallet_signature=owner.sign(challenge.document),
        ),
        action="link_wallet",
    )
    _refused(conn, "pairing_code_used", lambda: pairing.claim(conn, offer.code, owner.account))


def test_an_offer_is_bound_to_the_readers_key_and_a_reader_signs_only_its_own_link(
    conn: Conn, meter_id: str, reader_key: PrivateKey, pki: PkiLayout, database_url: str
) -> None:
    other = provision(pki, database_url, f"{meter_id}-x")
    offer = pairing.make_offer(meter_id)
    _refused(
        conn,
        "bad_meter_signature",
        lambda: pairing.register_offer(
            conn,
            offer.document,
            kid=meter_kid(conn, meter_id),
            signature=b64url(other.sign(offer.document.encode())),
        ),
        action="pair_offer",
    )
    stranger = EvmWallet.new().account
    _refused(conn, "pairing_code_unknown", lambda: pairing.claim(conn, offer.code, stranger))

    mine = _offer(conn, meter_id, reader_key, timedelta(minutes=5))
    document = pairing.claim(conn, mine.code, EvmWallet.new().account).document
    for forged in (
        document.replace(f"meter: {meter_id}\n", f"meter: {meter_id}-x\n"),
        document.replace(f"pairing: {mine.id}", f"pairing: {offer.id}"),
    ):
        with pytest.raises(RefusedError) as caught:
            pairing.check_link_document(forged, meter_id=meter_id, pairing_id=mine.id)
        assert caught.value.code == "pairing_document_mismatch"


def test_the_owner_pairs_through_meters_link_wallet(
    tmp_path: Path, pki: PkiLayout, database_url: str, meter_id: str, reader_key: PrivateKey,
    conn: Conn,
) -> None:  # fmt: skip
    """The owner's side as a person runs it: `meters link-wallet --pairing-code`, then the
    wallet's signature alone in step 2, since the reader signed; the code is then spent."""

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-P", "-m", "meterproof", "meters", "link-wallet", meter_id, *args],
            capture_output=True, text=True, check=False, timeout=60,
            env={"PATH": "/usr/bin:/bin", "METERPROOF_DATABASE_URL": database_url},
        )  # fmt: skip
        assert (done.returncode == 0) == ok, (args, done.stdout, done.stderr)
        return done

    reader = PairProcess(tmp_path, pki, database_url, meter_id, valid_for=120)
    code = reader.code()
    owner = EvmWallet.new()
    step1 = run("--wallet", str(owner.account), "--pairing-code", code)
    document = step1.stdout
    assert "pairing: " in document
    assert f"meter: {meter_id}\n" in document
    assert "the paired reader signs it itself" in step1.stderr
    status, output = reader.finish()
    assert status == 0, output

    challenge = next(
        line.removeprefix("challenge: ")
        for line in document.splitlines()
        if line.startswith("challenge: ")
    )
    signature = tmp_path / "wallet.sig"
    signature.write_text(owner.sign(document))
    done = run("--wallet", str(owner.account), "--challenge", challenge, "--signature",
               str(signature))  # fmt: skip
    assert f"{meter_id}: linked to {owner.account}" in done.stdout
    link = wallets.current_link(conn, meter_id)
    assert link is not None
    assert link.account == str(owner.account)
    again = run("--wallet", str(owner.account), "--pairing-code", code, ok=False)
    assert "pairing_code_used" in again.stderr


def test_a_pairing_code_is_not_spent_on_the_evm_zero_address(
    conn: Conn, meter_id: str, reader_key: PrivateKey
) -> None:
    """GRID can never be minted to the zero address: refused before the code is spent."""
    zero = AccountId.parse("eip155:1337:0x" + "00" * 20)
    offer = _offer(conn, meter_id, reader_key, timedelta(minutes=5))
    _refused(conn, "zero_wallet", lambda: pairing.claim(conn, offer.code, zero))
    assert conn.execute("SELECT count(*) FROM wallet_challenges").fetchone() == (0,)
    pairing.claim(conn, offer.code, EvmWallet.new().account)  # still unspent
