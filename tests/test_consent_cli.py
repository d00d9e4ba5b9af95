"""The consent commands as an operator and an owner run them: a real PostgreSQL, the stack's
PKI and broker, every step a `meterproof` process."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from consent_harness import EvmWallet
from fixtures.servers import OwnBroker
from ingest_harness import provision

from meterproof.certs.layout import PkiLayout

pytestmark = pytest.mark.slow


def _field(document: str, key: str) -> str:
    return next(
        line.removeprefix(f"{key}: ")
        for line in document.splitlines()
        if line.startswith(f"{key}: ")
    )


def test_link_grant_list_and_revoke_through_the_commands(
    pki: PkiLayout, own_broker: Callable[..., OwnBroker], database_url: str, tmp_path: Path
) -> None:
    # A broker of its own: adding and revoking an integrator each send SIGHUP.
    env_file = own_broker().env.run_dir / "stack.env"

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-P", "-m", "meterproof", *args],
            capture_output=True, text=True, check=False, timeout=60,
            env={"PATH": "/usr/bin:/bin", "METERPROOF_DATABASE_URL": database_url,
                 "METERPROOF_STACK_ENV": str(env_file), "METERPROOF_PKI_ROOT": str(pki.root)},
        )  # fmt: skip
        assert (done.returncode == 0) == ok, (args, done.stdout, done.stderr)
        return done

    def file(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    meter_id = f"cli-{uuid.uuid4().hex[:8]}"
    integrator = f"acme-{uuid.uuid4().hex[:6]}"
    provision(pki, database_url, meter_id)
    owner = EvmWallet.new()
    wallet = str(owner.account)

    added = run("integrators", "add", integrator)
    assert "client secret (shown once)" in added.stdout

    document = run("meters", "link-wallet", meter_id, "--wallet", wallet).stdout
    assert document.startswith("meterproof link-wallet v1\n")
    signed = run("meter", "sign-document", "--meter-id", meter_id, file("link.txt", document))
    run("meters", "link-wallet", meter_id, "--wallet", wallet,
        "--challenge", _field(document, "challenge"),
        "--signature", file("wallet.sig", owner.sign(document)),
        "--kid", signed.stderr.strip().removeprefix("--kid "),
        "--meter-signature", file("meter.sig", signed.stdout))  # fmt: skip
    assert meter_id in run("meters", "list", "--wallet", wallet).stdout
    # The filters apply to a wallet's meters too (they were dropped without a word).
    assert meter_id in run("meters", "list", "--wallet", wallet, "--status", "active").stdout
    assert run("meters", "list", "--wallet", wallet, "--status", "maintenance").stdout == ""

    grant = ("--integrator", integrator, "--meter", meter_id, "--scope", "live,history")
    consent = run("consent", "request", *grant, "--signer", wallet).stdout
    forged = run("consent", "grant", *grant, "--signer", wallet,
                 "--challenge", _field(consent, "challenge"),
                 "--signature", file("forged.sig", EvmWallet.new().sign(consent)),
                 ok=False)  # fmt: skip
    assert forged.returncode == 2
    assert "bad_signature" in forged.stderr.splitlines()[-1]
    assert "Traceback" not in forged.stderr

    consent = run("consent", "request", *grant, "--signer", wallet).stdout
    granted = run("consent", "grant", *grant, "--signer", wallet,
                  "--challenge", _field(consent, "challenge"),
                  "--signature", file("owner.sig", owner.sign(consent))).stdout  # fmt: skip
    consent_id = granted.split()[1].rstrip(":")
    listed = run("consent", "list", "--integrator", integrator).stdout
    assert consent_id in listed
    assert "active" in listed
    shown = run("consent", "show", consent_id).stdout
    assert f"granted by {wallet}" in shown

    revoked = run("integrators", "revoke", integrator, "--reason", "contract ended").stdout
    assert "revoked" in revoked
    assert "disconnected and refused from now on" in revoked
    assert "revoked" in run("integrators", "show", integrator).stdout
