"""The operator PKI: files, certificate contents, revocation, bulk issuance and the CLI.

No servers: a TLS handshake between two in-process `ssl` endpoints (OpenSSL, as in
Mosquitto) checks that the chain, the CRL and the validity windows do what they claim.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import stat
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meterproof.certs import (
    IdentityConflictError,
    MissingCaError,
    PkiError,
    PkiLayout,
    UnknownIdentityError,
    init_pki,
    issue_bulk,
    issue_device,
    issue_ingest_workers,
    issue_integrator,
    issue_service,
    load_identity,
    read_bulk_csv,
    refresh_crl,
    revoke,
)
from meterproof.certs import crl as certs_crl
from meterproof.certs import keys as certs_keys
from meterproof.certs.cli import certs as certs_cli
from meterproof.certs.crl import CRL_VALIDITY
from meterproof.certs.layout import IdentityFiles
from meterproof.config import StackEnv
from meterproof.schemas.signatures import load_private_key, load_public_key


@pytest.fixture(scope="module")
def pki_template(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    layout = PkiLayout(tmp_path_factory.mktemp("template") / "pki")
    init_pki(layout, ca_key="ec-p384", server_names=("broker.example", "10.0.0.7", "::1"))
    return layout


@pytest.fixture
def pki(pki_template: PkiLayout, tmp_path: Path) -> PkiLayout:
    """A private copy of an initialised PKI (copytree keeps the modes)."""
    root = tmp_path / "pki"
    shutil.copytree(pki_template.root, root)
    return PkiLayout(root)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _crl(layout: PkiLayout) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(layout.crl.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(value, str)
    return value


def _run(layout: PkiLayout, *args: str) -> Result:
    return CliRunner().invoke(certs_cli, ["--pki-root", str(layout.root), *args])


def _assert_one_line_error(result: Result) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr


# --- init ---------------------------------------------------------------------------


def test_init_creates_everything_and_a_second_run_changes_no_ca_byte(tmp_path: Path) -> None:
    layout = PkiLayout(tmp_path / "pki")
    first = init_pki(layout)
    assert (first.ca_created, first.server_created, first.crl_written) == (True, True, True)
    assert first.oracle_created
    assert first.services_created == ("ingest-0", "ingest-1", "bridge", "api", "admin")
    root_key = _cert(layout.ca_cert).public_key()
    assert isinstance(root_key, rsa.RSAPublicKey)
    assert root_key.key_size == 4096
    ca_files = {p: p.read_bytes() for p in layout.ca_dir.iterdir() if p.suffix in {".crt", ".key"}}
    server = layout.server_cert.read_bytes()

    second = init_pki(layout, ca_key="ec-p384")
    assert (second.ca_created, second.server_created, second.crl_written) == (False,) * 3
    assert not second.oracle_created
    assert second.services_created == ()
    assert second.ca_key == "RSA-4096"
    assert {p: p.read_bytes() for p in ca_files} == ca_files
    assert layout.server_cert.read_bytes() == server


def test_init_recreates_a_missing_server_certificate_crl_and_service(pki: PkiLayout) -> None:
    ca = pki.ca_cert.read_bytes()
    shutil.rmtree(pki.server_cert.parent)
    pki.crl.unlink()
    shutil.rmtree(pki.service("bridge").directory)
    result = init_pki(pki)
    assert (result.ca_created, result.server_created, result.crl_written) == (False, True, True)
    assert result.services_created == ("bridge",)
    assert pki.ca_cert.read_bytes() == ca


def test_init_re_signs_a_crl_past_half_its_life(
    pki: PkiLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(certs_crl, "CRL_VALIDITY", timedelta(days=1))
    refresh_crl(pki)
    monkeypatch.undo()
    assert init_pki(pki).crl_written
    next_update = _crl(pki).next_update_utc
    assert next_update is not None
    assert next_update - datetime.now(UTC) > CRL_VALIDITY - timedelta(minutes=1)
    assert not init_pki(pki).crl_written


def test_init_refuses_an_incomplete_ca_directory(tmp_path: Path) -> None:
    layout = PkiLayout(tmp_path / "pki")
    layout.ca_dir.mkdir(parents=True)
    layout.ca_key.write_bytes(b"someone's key")
    result = _run(layout, "init", "--ca-key", "ec-p384")
    _assert_one_line_error(result)
    assert "incomplete" in result.stderr
    assert layout.ca_key.read_bytes() == b"someone's key"


def test_the_root_signs_only_the_issuing_ca_which_signs_the_leaves(pki: PkiLayout) -> None:
    root, issuing = _cert(pki.ca_cert), _cert(pki.issuing_cert)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    issuing.verify_directly_issued_by(root)
    assert issuing.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    issuing_key = issuing.public_key()
    assert isinstance(issuing_key, ec.EllipticCurvePublicKey)
    assert issuing_key.curve.name == "secp256r1"
    server, chained = _certs(pki.server_cert)
    assert chained == issuing
    server.verify_directly_issued_by(issuing)


def test_broker_certificate_names_and_usage(pki: PkiLayout) -> None:
    server = _cert(pki.server_cert)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "broker.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "10.0.0.7",
        "::1",
    ]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)


def test_oracle_key_pair_is_ed25519(pki: PkiLayout) -> None:
    private = load_private_key("EdDSA", pki.oracle_key.read_bytes())
    public = load_public_key("EdDSA", pki.oracle_pub.read_bytes())
    assert public.verify(private.sign(b"epoch"), b"epoch")


# --- device identities --------------------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "rsa_bits"), [("EdDSA", 4096), ("ES256", 4096), ("RS256", 2048), ("PS256", 2048)]
)
def test_device_certificate_and_signing_key(pki: PkiLayout, alg: str, rsa_bits: int) -> None:
    files = issue_device(pki, "SM2025-ENG-001", alg=alg, rsa_bits=rsa_bits, days=30)
    leaf, issuing = _certs(files.cert)
    leaf.verify_directly_issued_by(issuing)
    assert _cn(leaf) == "SM2025-ENG-001"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    tls_key = leaf.public_key()
    assert isinstance(tls_key, ec.EllipticCurvePublicKey)
    assert tls_key.curve.name == "secp256r1"
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(days=30, minutes=5)

    record = load_identity(files)
    assert (record.role, record.name, record.alg) == ("meter", "SM2025-ENG-001", alg)
    assert record.serial == format(leaf.serial_number, "x")
    assert record.sha256_fingerprint == leaf.fingerprint(hashes.SHA256()).hex()
    assert record.not_after == leaf.not_valid_after_utc

    signer = load_private_key(alg, files.signing_key.read_bytes())
    verifier = load_public_key(alg, files.signing_pub.read_text())
    assert verifier.verify(signer.sign(b"reading"), b"reading")


def test_serials_are_random_and_distinct(pki: PkiLayout) -> None:
    serials = {load_identity(issue_device(pki, f"m{n}")).serial for n in range(5)}
    assert len(serials) == 5
    assert all(len(serial) > 30 for serial in serials)


def test_private_keys_are_0600_and_directories_0700_even_with_umask_0(tmp_path: Path) -> None:
    layout = PkiLayout(tmp_path / "fresh" / "pki")
    previous = os.umask(0)
    try:
        init_pki(layout, ca_key="ec-p384")
        issue_device(layout, "m1")
        issue_integrator(layout, "acme")
        revoke(layout, "m1")
    finally:
        os.umask(previous)
    private = {layout.ca_key, layout.issuing_key, layout.server_key, layout.oracle_key}
    private |= set(layout.root.rglob("*.key"))
    assert len(private) == 4 + 5 + 2 + 1  # CA, server, oracle; services; meter; integrator
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in [layout.root, *(p for p in layout.root.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for path in (layout.ca_cert, layout.crl, layout.device("m1").cert):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_expired_and_foreign_certificates_can_be_made_for_tests(
    pki: PkiLayout, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    expired = issue_device(pki, "old", not_before=now - timedelta(days=9), not_after=now)
    assert _cert(expired.cert).not_valid_after_utc <= now
    with pytest.raises(ValueError, match="issuing CA"):
        issue_device(pki, "forever", days=100_000)
    with pytest.raises(ValueError, match="not after"):
        issue_device(pki, "backwards", not_before=now, not_after=now - timedelta(days=1))

    rogue = PkiLayout(tmp_path / "rogue")
    init_pki(rogue, ca_key="ec-p384")
    foreign = issue_device(rogue, "m1")
    assert _cn(_cert(foreign.cert)) == "m1"
    # Same subject names as the real CA, another key: only the signature tells them apart.
    assert _cert(foreign.cert).issuer == _cert(pki.issuing_cert).subject
    with pytest.raises(InvalidSignature):
        _cert(foreign.cert).verify_directly_issued_by(_cert(pki.issuing_cert))


def test_issuing_without_a_ca_is_refused(tmp_path: Path) -> None:
    layout = PkiLayout(tmp_path / "empty")
    with pytest.raises(MissingCaError, match="certs init"):
        issue_device(layout, "m1")
    result = _run(layout, "issue", "m1")
    _assert_one_line_error(result)
    assert "no CA: run `meterproof certs init` first" in result.stderr
    assert not layout.device("m1").directory.exists()


def test_a_failed_issue_leaves_no_half_written_identity(
    pki: PkiLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = certs_keys.write_new_file
    calls = []

    def failing(path: Path, data: bytes, *, mode: int) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(path, data, mode=mode)

    monkeypatch.setattr(certs_keys, "write_new_file", failing)
    with pytest.raises(OSError, match="No space"):
        issue_device(pki, "m1")
    assert not pki.device("m1").directory.exists()
    assert list(pki.staging_dir.iterdir()) == []


# --- names --------------------------------------------------------------------------


def test_names_are_one_namespace_across_roles(pki: PkiLayout) -> None:
    issue_device(pki, "shared")
    with pytest.raises(IdentityConflictError, match="meter"):
        issue_device(pki, "shared")
    with pytest.raises(IdentityConflictError, match="meter"):
        issue_integrator(pki, "shared")
    issue_integrator(pki, "acme")
    with pytest.raises(IdentityConflictError, match="integrator"):
        issue_device(pki, "acme")
    for service in ("ingest", "bridge", "api", "admin", "ingest-0", "ingest-7", "ingest-9999"):
        with pytest.raises(IdentityConflictError, match="reserved"):
            issue_device(pki, service)
        with pytest.raises(IdentityConflictError, match="reserved"):
            issue_integrator(pki, service)
    issue_device(pki, "ingest-07")  # not an instance name: ingest-7 is
    with pytest.raises(IdentityConflictError, match="service"):
        issue_service(pki, "ingest", instance=0)
    with pytest.raises(IdentityConflictError, match="service"):
        issue_service(pki, "bridge")


def test_ingest_workers_get_one_identity_each(pki: PkiLayout) -> None:
    with pytest.raises(ValueError, match="instance"):
        issue_service(pki, "ingest")
    with pytest.raises(ValueError, match="instance"):
        issue_service(pki, "bridge", instance=1)
    assert issue_ingest_workers(pki, 4) == ("ingest-2", "ingest-3")
    assert issue_ingest_workers(pki, 4) == ()
    serials = {load_identity(pki.service(f"ingest-{i}")).serial for i in range(4)}
    assert len(serials) == 4
    assert _cn(_cert(pki.service("ingest-3").cert)) == "ingest-3"


def test_issue_service_command(pki: PkiLayout, tmp_path: Path) -> None:
    no_stack = ("--stack-env", str(tmp_path / "none"))
    result = _run(pki, "issue-service", "ingest", "--instances", "3", *no_stack)
    assert result.exit_code == 0, result.output
    assert "issued: ingest-2" in result.stdout
    assert "no stack recorded" in result.stdout
    again = _run(pki, "issue-service", "ingest", "--instances", "3", *no_stack)
    assert "issued: none" in again.stdout
    _assert_one_line_error(_run(pki, "issue-service", "bridge", "--instances", "2", *no_stack))
    _assert_one_line_error(_run(pki, "issue-service", "bridge", *no_stack))  # exists


def test_integrator_identity(pki: PkiLayout) -> None:
    result = _run(pki, "issue-integrator", "acme-grid")
    assert result.exit_code == 0, result.output
    files = pki.integrator("acme-grid")
    leaf = _cert(files.cert)
    assert _cn(leaf) == "acme-grid"
    assert load_identity(files).role == "integrator"
    assert not (files.directory / "signing.key").exists()
    _assert_one_line_error(_run(pki, "issue", "acme-grid"))


def test_service_identities_are_client_certificates(pki: PkiLayout) -> None:
    for name in ("ingest-0", "ingest-1", "bridge", "api", "admin"):
        files = pki.service(name)
        assert _cn(_cert(files.cert)) == name
        assert load_identity(files).role == "service"


@pytest.mark.parametrize("bad", ["..", ".", "a/b", "x" * 65, "", "m 1", "mé", "a+b", "#"])
def test_bad_identities_are_refused_with_one_line(pki: PkiLayout, bad: str) -> None:
    for command in ("issue", "issue-integrator", "revoke"):
        result = _run(pki, command, bad)
        _assert_one_line_error(result)
        assert "invalid identity" in result.stderr
    with pytest.raises(ValueError, match="invalid identity"):
        issue_device(pki, bad)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["issue", "m1", "--alg", "HS256"], "HS256"),
        (["issue", "m1", "--rsa-bits", "2048"], "RS256 and PS256 only"),
        (["issue", "m1", "--alg", "RS256", "--rsa-bits", "1024"], "1024"),
        (["issue", "m1", "--days", "0"], "0"),
        (["issue-bulk", "--count", "0"], "0"),
        (["issue-bulk"], "--count"),
        (["issue-bulk", "--count", "2", "--prefix", "bad/"], "prefix"),
        (["init", "--server-name", "bad name"], "DNS name"),
        (["init", "--ca-key", "dsa"], "dsa"),
    ],
)
def test_bad_options_are_refused_with_one_line(
    pki: PkiLayout, args: list[str], message: str
) -> None:
    result = _run(pki, *args)
    _assert_one_line_error(result)
    assert message in result.stderr


@pytest.mark.parametrize(
    "command",
    [[], ["init"], ["issue"], ["issue-bulk"], ["issue-integrator"], ["revoke"], ["refresh-crl"],
     ["list"]],
)  # fmt: skip
def test_every_command_explains_itself(command: list[str]) -> None:
    result = CliRunner().invoke(certs_cli, [*command, "--help"])
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) > 5


# --- revocation ---------------------------------------------------------------------


def test_revoke_puts_the_serial_in_a_crl_signed_by_the_issuing_ca(pki: PkiLayout) -> None:
    files = issue_device(pki, "m1")
    serial = _cert(files.cert).serial_number
    before = _crl(pki)
    result = revoke(pki, "m1")
    assert not result.already_revoked
    assert result.serial == format(serial, "x")
    crl = _crl(pki)
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    issuing_key = _cert(pki.issuing_cert).public_key()
    assert isinstance(issuing_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(issuing_key)
    assert crl.issuer == _cert(pki.issuing_cert).subject
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - datetime.now(UTC) > CRL_VALIDITY - timedelta(minutes=1)

    again = revoke(pki, "m1")
    assert again.already_revoked
    assert len(list(_crl(pki))) == 1


def test_revoking_an_unknown_meter_is_refused(pki: PkiLayout) -> None:
    with pytest.raises(UnknownIdentityError):
        revoke(pki, "ghost")
    issue_integrator(pki, "acme")
    with pytest.raises(UnknownIdentityError):
        revoke(pki, "acme")
    result = _run(pki, "revoke", "ghost")
    _assert_one_line_error(result)
    assert "no meter or service 'ghost'" in result.stderr
    result = _run(pki, "revoke", "acme")
    _assert_one_line_error(result)
    assert "`meterproof integrators revoke acme`" in result.stderr
    assert not certs_crl.read_revoked(pki)


def test_a_leaked_service_certificate_can_be_revoked(pki: PkiLayout, tmp_path: Path) -> None:
    """A stolen worker or bridge certificate carries its rights until revoked, so the
    operator's command takes service identities too, and the handshake then fails."""
    assert _handshake(pki, pki.service("bridge"), server_hostname="127.0.0.1") == "bridge"
    result = _run(pki, "revoke", "bridge", "--stack-env", str(tmp_path / "absent.env"))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("bridge: certificate ")
    serial = _cert(pki.service("bridge").cert).serial_number
    assert _crl(pki).get_revoked_certificate_by_serial_number(serial) is not None
    assert "revoked" in _handshake(pki, pki.service("bridge"), server_hostname="127.0.0.1")


def test_revoke_cli_without_a_stack_only_updates_the_crl(pki: PkiLayout, tmp_path: Path) -> None:
    issue_device(pki, "m1")
    result = _run(pki, "revoke", "m1", "--stack-env", str(tmp_path / "absent.env"))
    assert result.exit_code == 0, result.output
    assert "loads the CRL when started" in result.stdout
    again = _run(pki, "revoke", "m1", "--stack-env", str(tmp_path / "absent.env"))
    assert again.exit_code == 0
    assert "already revoked" in again.stdout


def _crl_number(layout: PkiLayout) -> int:
    return _crl(layout).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_refresh_crl_re_signs_only_a_crl_past_half_its_life(
    pki: PkiLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run daily from cron: a fresh CRL is left alone (no new number, no broker signal),
    one past half its life is re-signed for the full validity, --force always re-signs.
    (tests/test_broker_acl.py has a real broker read the new one.)"""
    no_stack = ("--stack-env", str(tmp_path / "absent.env"))
    fresh = pki.crl.read_bytes()
    result = _run(pki, "refresh-crl", *no_stack)
    assert result.exit_code == 0, result.output
    until = _crl(pki).next_update_utc
    assert until is not None
    assert (
        result.stdout
        == f"CRL {pki.crl}: fresh, left as it is; valid until {until:%Y-%m-%d %H:%M:%S} UTC\n"
    )
    assert pki.crl.read_bytes() == fresh

    monkeypatch.setattr(certs_crl, "CRL_VALIDITY", timedelta(days=1))
    refresh_crl(pki)
    monkeypatch.undo()
    number = _crl_number(pki)
    result = _run(pki, "refresh-crl", *no_stack)
    assert result.exit_code == 0, result.output
    assert "re-signed; valid until" in result.stdout
    assert "no running stack" in result.stdout
    assert _crl_number(pki) == number + 1
    until = _crl(pki).next_update_utc
    assert until is not None
    assert until - datetime.now(UTC) > CRL_VALIDITY - timedelta(minutes=1)

    assert _run(pki, "refresh-crl", *no_stack).exit_code == 0
    assert _crl_number(pki) == number + 1
    forced = _run(pki, "refresh-crl", "--force", *no_stack)
    assert forced.exit_code == 0, forced.output
    assert "re-signed" in forced.stdout
    assert _crl_number(pki) == number + 2


def _fake_admin(monkeypatch: pytest.MonkeyPatch, effect: BaseException | None) -> list[object]:
    """Stands in for the broker call of `mosquitto.admin`; the broker tests exercise it."""
    calls: list[object] = []

    def enforce_revocation(identity: str, env: StackEnv) -> None:
        calls.append((identity, env.mqtt_admin_port))
        if effect is not None:
            raise effect

    from meterproof.mosquitto import admin

    monkeypatch.setattr(admin, "enforce_revocation", enforce_revocation)
    return calls


@pytest.mark.parametrize(
    "case",
    [
        (None, 0, "refused from now on"),
        (ConnectionRefusedError("no running broker"), 0, "loads the CRL when started"),
        (OSError("admin login refused"), 1, "CRL updated, but the broker did not confirm"),
    ],
)
def test_revoke_cli_tells_a_running_broker(
    pki: PkiLayout,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[BaseException | None, int, str],
) -> None:
    effect, exit_code, message = case
    calls = _fake_admin(monkeypatch, effect)
    issue_device(pki, "m1")
    env_file = tmp_path / "stack.env"
    env_file.write_text("METERPROOF_MQTT_ADMIN_PORT=1999\n")
    result = _run(pki, "revoke", "m1", "--stack-env", str(env_file))
    assert result.exit_code == exit_code, result.output
    assert message in result.output
    if exit_code:
        _assert_one_line_error(result)
    assert calls == [("m1", 1999)]
    serial = _cert(pki.device("m1").cert).serial_number
    assert _crl(pki).get_revoked_certificate_by_serial_number(serial) is not None


# --- bulk ---------------------------------------------------------------------------


def test_issue_bulk_cli_writes_every_device_and_the_summary(pki: PkiLayout, tmp_path: Path) -> None:
    out = tmp_path / "fleet.csv"
    result = _run(pki, "issue-bulk", "--count", "20", "--prefix", "bench-", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "issued 20/20" in result.stderr
    rows = read_bulk_csv(out)
    assert len(rows) == 20
    assert len(out.read_text().splitlines()) == 21
    for row in rows:
        assert row.meter_id.startswith("bench-")
        assert len(row.meter_id) == len("bench-") + 36
        files = pki.device(row.meter_id)
        assert row.public_key_pem == files.signing_pub.read_text()
        assert row.cert_fingerprint == _cert(files.cert).fingerprint(hashes.SHA256()).hex()
        assert row.serial == load_identity(files).serial
        assert row.alg == "EdDSA"
        load_public_key(row.alg, row.public_key_pem)


def test_issue_bulk_from_csv_with_default_summary_path(pki: PkiLayout, tmp_path: Path) -> None:
    source = tmp_path / "ids.csv"
    source.write_text("site,meter_id\nnorth,n-1\nsouth,s-1\n")
    result = _run(pki, "issue-bulk", "--from-csv", str(source), "--alg", "ES256")
    assert result.exit_code == 0, result.output
    [summary] = pki.devices_dir.glob("bulk-*.csv")
    assert [(row.meter_id, row.alg) for row in read_bulk_csv(summary)] == [
        ("n-1", "ES256"),
        ("s-1", "ES256"),
    ]


def test_issue_bulk_from_a_csv_with_a_short_row_is_refused_with_its_line(
    pki: PkiLayout, tmp_path: Path
) -> None:
    source = tmp_path / "ids.csv"
    source.write_text("site,meter_id\nnorth,n-1\nsouth\n")
    result = _run(pki, "issue-bulk", "--from-csv", str(source))
    _assert_one_line_error(result)
    assert "line 3: no `meter_id` cell" in result.stderr
    assert not pki.device("n-1").directory.exists()


@pytest.mark.parametrize(
    ("ids", "error", "match"),
    [
        (["a", "b", "a"], PkiError, "'a' appears more than once"),
        (["a", "taken"], IdentityConflictError, "'taken' already exists as a meter identity"),
        (["a", "ingest"], IdentityConflictError, "'ingest' is reserved for a service identity"),
        (["a", "bad/id"], ValueError, "invalid identity 'bad/id'"),
    ],
)
def test_issue_bulk_checks_every_id_before_issuing_any(
    pki: PkiLayout, ids: list[str], error: type[Exception], match: str
) -> None:
    issue_device(pki, "taken")
    with pytest.raises(error, match=match):
        issue_bulk(pki, ids)
    assert not pki.device("a").directory.exists()


def test_issue_bulk_reports_each_device_as_it_goes(pki: PkiLayout) -> None:
    seen: list[str] = []
    issued = issue_bulk(
        pki,
        ["x1", "x2", "x3"],
        alg="PS256",
        rsa_bits=2048,
        on_issued=lambda d: seen.append(d.record.name),
    )
    assert seen == ["x1", "x2", "x3"] == [device.record.name for device in issued]
    assert all(isinstance(device.public_key_pem, str) for device in issued)


# --- the CLI never shows a private key ----------------------------------------------


def test_no_private_key_material_in_any_output(tmp_path: Path) -> None:
    layout = PkiLayout(tmp_path / "pki")
    no_stack = str(tmp_path / "none")
    outputs = [
        _run(layout, "init", "--ca-key", "ec-p384"),
        _run(layout, "issue", "m1"),
        _run(layout, "issue", "r1", "--alg", "RS256", "--rsa-bits", "2048"),
        _run(layout, "issue-bulk", "--count", "3"),
        _run(layout, "issue-integrator", "acme", "--stack-env", no_stack),
        _run(layout, "issue-service", "ingest", "--instances", "3", "--stack-env", no_stack),
        _run(layout, "revoke", "m1", "--stack-env", no_stack),
        _run(layout, "list"),
    ]
    assert all(result.exit_code == 0 for result in outputs), [r.output for r in outputs]
    text = "".join(result.stdout + result.stderr for result in outputs)
    assert "PRIVATE KEY" not in text
    secrets = list(layout.root.rglob("*.key"))
    assert len(secrets) == 4 + 6 + 2 * 5 + 1  # CA, server, oracle; services; meters; acme
    for path in secrets:
        body = path.read_text().splitlines()[1]
        assert body not in text
    assert "BEGIN PUBLIC KEY" in outputs[1].stdout


def test_list_shows_roles_and_revocation(pki: PkiLayout) -> None:
    issue_device(pki, "m1")
    issue_device(pki, "m2")
    issue_integrator(pki, "acme")
    revoke(pki, "m1")
    lines = {
        tuple(line.split()[:2]): line.split()[-1] for line in _run(pki, "list").stdout.splitlines()
    }
    assert lines[("meter", "m1")] == "revoked"
    assert lines[("meter", "m2")] == "valid"
    assert lines[("integrator", "acme")] == "valid"
    assert lines[("service", "ingest-0")] == "valid"


# --- what OpenSSL (and so Mosquitto) makes of it ------------------------------------


def _handshake(
    layout: PkiLayout, client: IdentityFiles, *, server_hostname: str = "localhost"
) -> str:
    """The client's CN as the server sees it, or the server's verification error."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(layout.server_cert, layout.server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cafile=layout.ca_cert)
    server_ctx.load_verify_locations(cafile=layout.crl)
    server_ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cafile=layout.ca_cert)
    client_ctx.load_cert_chain(client.cert, client.key)
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(5)
    client_sock.settimeout(5)

    def serve() -> str:
        try:
            with server_ctx.wrap_socket(server_sock, server_side=True) as tls:
                peer = tls.getpeercert(binary_form=True)
                assert peer is not None
                return _cn(x509.load_der_x509_certificate(peer))
        except ssl.SSLError as exc:
            return f"refused: {exc}"

    with ThreadPoolExecutor(1) as pool, client_sock:
        served = pool.submit(serve)
        try:
            with client_ctx.wrap_socket(client_sock, server_hostname=server_hostname) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass  # the server's alert; its own side says why
        return served.result()


def test_openssl_accepts_valid_clients_and_sees_their_cn(pki: PkiLayout) -> None:
    assert _handshake(pki, issue_device(pki, "m1")) == "m1"
    assert _handshake(pki, pki.service("ingest-0"), server_hostname="127.0.0.1") == "ingest-0"
    assert _handshake(pki, issue_integrator(pki, "acme")) == "acme"


@pytest.mark.parametrize("case", ["revoked", "expired", "foreign"])
def test_openssl_refuses_revoked_expired_and_foreign_clients(
    pki: PkiLayout, tmp_path: Path, case: str
) -> None:
    make: dict[str, Callable[[], IdentityFiles]] = {
        "revoked": lambda: (issue_device(pki, "m1"), revoke(pki, "m1"))[0],
        "expired": lambda: issue_device(
            pki,
            "m1",
            not_before=datetime.now(UTC) - timedelta(days=2),
            not_after=datetime.now(UTC) - timedelta(days=1),
        ),
        "foreign": lambda: (
            init_pki(PkiLayout(tmp_path / "rogue"), ca_key="ec-p384"),
            issue_device(PkiLayout(tmp_path / "rogue"), "m1"),
        )[1],
    }
    reason = {"revoked": "revoked", "expired": "expired", "foreign": "unable to get"}
    assert reason[case] in _handshake(pki, make[case]())


def test_a_verifier_whose_clock_is_behind_accepts_clients_right_after_a_revocation(
    pki: PkiLayout,
) -> None:
    """A broker a minute behind the CA's host must not refuse every client with "CRL is
    not yet valid" when the CRL a revocation just re-signed arrives."""
    valid = issue_device(pki, "m1")
    revoked = issue_device(pki, "m2")
    revoke(pki, "m2")
    behind = int((datetime.now(UTC) - timedelta(minutes=1)).timestamp())

    def verify(files: IdentityFiles) -> str:
        done = subprocess.run(
            ["openssl", "verify", "-CAfile", pki.ca_cert, "-untrusted", pki.issuing_cert,
             "-CRLfile", pki.crl, "-crl_check", "-attime", str(behind), files.cert],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        return done.stdout + done.stderr

    assert ": OK" in verify(valid)
    assert "certificate revoked" in verify(revoked)
