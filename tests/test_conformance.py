"""`meterproof conformance`: the pure checks on hand-made observations, the capture command,
and live runs: the reference meter passes, and each deliberately broken meter of
tests/conformance_meters/ fails the check that names its defect."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import pytest
from click.testing import CliRunner
from conformance_meters.vendor_ca import VendorCa
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client import REGISTRY

from meterproof.cli.main import main
from meterproof.conformance.checks import Verdict, run_checks
from meterproof.conformance.kit import _LogTail, _Recorder
from meterproof.conformance.observations import (
    Connected,
    Observation,
    Published,
    ReceiptSent,
    Subscribed,
    Window,
    parse_log_line,
)
from meterproof.conformance.report import TITLES, as_table
from meterproof.conformance.vendor import IdentityRefusedError, VendorIdentity, accept
from meterproof.schemas.codec import decode_reading, encode_reading, sign_reading
from meterproof.schemas.reading import Alg
from meterproof.schemas.signatures import PrivateKey, generate_private_key
from meterproof.schemas.signing import reading_hash, signing_bytes
from meterproof.schemas.timestamps import wall_ms

ROOT = Path(__file__).resolve().parents[1]
METER = "m-1"
TOPIC = f"meters/{METER}/readings"
NOW = wall_ms()


def _payload(key: PrivateKey, seq: int, *, ts: int | None = None, wh: int | None = None) -> bytes:
    fields = {
        "meter_id": METER,
        "seq": seq,
        "ts": NOW + seq * 1000 if ts is None else ts,
        "import_wh": 1000 + seq if wh is None else wh,
        "export_wh": 0,
    }
    return encode_reading(sign_reading(fields, key))


def _digest(payload: bytes) -> str:
    return reading_hash(signing_bytes(decode_reading(payload))).hex()


def _obs(key: PrivateKey, payloads: list[bytes], **live: object) -> Observation:
    published = [Published(float(i), TOPIC, p, wall_ms=NOW) for i, p in enumerate(payloads)]
    return Observation(METER, key.public_key(), published, **live)  # type: ignore[arg-type]


def _by_check(verdicts: list[Verdict]) -> dict[str, Verdict]:
    return {v.check: v for v in verdicts}


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return generate_private_key(Alg.EDDSA)


def test_honest_payloads_pass_every_payload_check(key: PrivateKey) -> None:
    verdicts = run_checks(_obs(key, [_payload(key, s) for s in (1, 2, 3)]))
    assert [v.check for v in verdicts] == ["signing_bytes", "strict_json", "key_binding", "seq_ts"]
    assert all(v.passed for v in verdicts), verdicts


@pytest.mark.parametrize(
    ("defect", "check", "reason"),
    [
        (lambda p: p.replace(b'"import_wh":1002', b'"import_wh":1002.0'), "strict_json", "1002.0"),
        (lambda p: p.replace(b'"seq":2,', b'"seq":2,"seq":2,'), "strict_json", "twice"),
        (lambda p: p.replace(b'"import_wh":1002', b'"import_wh":1003'), "signing_bytes", "seq 2"),
        (lambda p: p.replace(b'"alg":"EdDSA"', b'"alg":"ES256"'), "key_binding", "ES256"),
        (lambda p: p.replace(b'"meter_id":"m-1"', b'"meter_id":"m-2"'), "key_binding", "m-2"),
    ],
)
def test_a_broken_payload_fails_its_check(
    key: PrivateKey, defect: object, check: str, reason: str
) -> None:
    payloads = [_payload(key, 1), defect(_payload(key, 2)), _payload(key, 3)]  # type: ignore[operator]
    verdict = _by_check(run_checks(_obs(key, payloads)))[check]
    assert verdict.status == "fail"
    assert any(reason in r or "malformed" in r for r in verdict.reasons), verdict.reasons


def test_a_lower_seq_arriving_late_is_a_republish_not_a_defect(key: PrivateKey) -> None:
    """Its first copy lost in an outage, seq 1 comes from the outbox after seq 2."""
    verdict = _by_check(run_checks(_obs(key, [_payload(key, 2), _payload(key, 1)])))["seq_ts"]
    assert verdict.status == "pass", verdict.reasons


@pytest.mark.parametrize(
    ("payloads", "reason"),
    [
        (lambda k: [_payload(k, 1), _payload(k, 2), _payload(k, 2, wh=5000)], "seq_reused"),
        (lambda k: [_payload(k, 2), _payload(k, 1, ts=NOW + 9_000)], "before seq 1"),
        (lambda k: [_payload(k, 1), _payload(k, 2, ts=NOW - 10_000)], "before seq 1"),
        (lambda k: [_payload(k, 1, wh=50), _payload(k, 2, wh=40)], "register_decreased"),
        (lambda k: [_payload(k, 1, ts=NOW + 3_600_000)], "timestamp_skew"),
        (lambda k: [_payload(k, 1, ts=NOW - 8 * 86_400_000)], "stale_reading"),
    ],
)
def test_seq_and_ts_misbehaviour_is_named(key: PrivateKey, payloads: object, reason: str) -> None:
    verdict = _by_check(run_checks(_obs(key, payloads(key))))["seq_ts"]  # type: ignore[operator]
    assert verdict.status == "fail"
    assert any(reason in r for r in verdict.reasons), verdict.reasons


def _live(key: PrivateKey, **changes: object) -> Observation:
    """A conforming live run: 5 readings, a receipt each, one republished in silence, one
    sent unreceipted before a power cut and again after it."""
    p = [_payload(key, s) for s in (1, 2, 3, 4, 5)]
    published = [
        Published(1.0, TOPIC, p[0], wall_ms=NOW),
        Published(2.0, TOPIC, p[1], wall_ms=NOW),
        Published(5.0, TOPIC, p[1], wall_ms=NOW),  # republished during the silence
        Published(12.0, TOPIC, p[2], wall_ms=NOW),  # after the outage
        Published(14.0, TOPIC, p[3], wall_ms=NOW),  # no receipt: the power goes at 16.0
        Published(18.0, TOPIC, p[3], wall_ms=NOW),  # from the outbox, after the restart
        Published(19.0, TOPIC, p[4], wall_ms=NOW),  # the counter went on
    ]
    obs = Observation(
        METER,
        key.public_key(),
        published,
        live=True,
        connects=[Connected(0.5, METER, "5", False, 30), Connected(11.0, METER, "5", False, 30)],
        subscribes=[
            Subscribed(0.6, METER, f"meters/{METER}/receipts", 1),
            Subscribed(11.0, METER, f"meters/{METER}/receipts", 1),
        ],
        receipts=[
            ReceiptSent(1.1, 1, _digest(p[0]), "accepted"),
            ReceiptSent(6.1, 2, _digest(p[1]), "accepted"),
            ReceiptSent(12.1, 3, _digest(p[2]), "accepted"),
            ReceiptSent(18.1, 4, _digest(p[3]), "accepted"),
            ReceiptSent(19.1, 5, _digest(p[4]), "accepted"),
        ],
        silence=Window(1.5, 6.0),
        outage=Window(7.0, 10.5),
        attempts=[7.4, 8.1, 9.3],
        reconnect_wait_s=5.0,
        power_cut=Window(13.0, 16.0),
    )
    for name, value in changes.items():
        setattr(obs, name, value)
    return obs


def test_a_conforming_live_run_passes(key: PrivateKey) -> None:
    verdicts = run_checks(_live(key))
    assert len(verdicts) == 9
    assert all(v.passed for v in verdicts), [v for v in verdicts if not v.passed]


def test_every_check_is_reported_with_its_spec_sections(key: PrivateKey) -> None:
    """The table names the sections a verdict holds the meter to (power_cut had none)."""
    table = as_table(run_checks(_live(key)))
    for check in (v.check for v in run_checks(_live(key))):
        assert check in TITLES, check
        assert TITLES[check] in table
        assert "(spec " in TITLES[check], check


@pytest.mark.parametrize(
    ("changes", "check", "reason"),
    [
        ({"subscribes": []}, "receipt_handling", "never subscribed"),
        (
            {"subscribes": [Subscribed(0.6, METER, f"meters/{METER}/receipts", 1)]},
            "receipt_handling",
            "connect at 11.0 s: did not subscribe to its receipts again",
        ),
        ({"silence": Window(6.0, 6.5)}, "republish", "no unreceipted reading"),
        ({"attempts": [7.0 + i * 0.05 for i in range(1, 60)]}, "reconnect_backoff", "tight"),
        ({"attempts": [7.5, 8.0, 8.5, 9.0, 9.5, 10.0]}, "reconnect_backoff", "do not back off"),
        ({"attempts": []}, "reconnect_backoff", "no connection attempt"),
        ({"connects": [Connected(0.5, METER, "5", True, 30)]}, "session", "clean start"),
        ({"connects": [Connected(0.5, METER, "5", False, 0)]}, "session", "keepalive 0"),
    ],
)
def test_live_misbehaviour_is_named(
    key: PrivateKey, changes: dict[str, object], check: str, reason: str
) -> None:
    verdict = _by_check(run_checks(_live(key, **changes)))[check]
    assert verdict.status == "fail"
    assert any(reason in r for r in verdict.reasons), verdict.reasons


def test_a_power_cut_that_loses_the_outbox_or_the_counter_is_named(key: PrivateKey) -> None:
    lost_outbox = _live(key)
    del lost_outbox.published[5]  # seq 4 never came again
    verdict = _by_check(run_checks(lost_outbox))["power_cut"]
    assert verdict.status == "fail"
    assert any("not sent again after it: seq [4]" in r for r in verdict.reasons)

    restarted_at_one = _live(key)
    restarted_at_one.published[6] = Published(19.0, TOPIC, _payload(key, 1, wh=99_999), wall_ms=NOW)
    verdict = _by_check(run_checks(restarted_at_one))["power_cut"]
    assert verdict.status == "fail"
    assert any("the counter was lost" in r for r in verdict.reasons), verdict.reasons


def test_receipt_handling_cannot_judge_without_a_parsed_receipt(key: PrivateKey) -> None:
    obs = _live(key, receipts=[ReceiptSent(1.0, None, None, "malformed")])
    verdict = _by_check(run_checks(obs))["receipt_handling"]
    assert verdict.status == "skip"


def test_a_receipted_reading_sent_again_fails_receipt_handling(key: PrivateKey) -> None:
    """Judged from the first receipt: the worker receipts the late copy too (`duplicate`),
    and that later receipt must not excuse it."""
    obs = _live(key)
    again = obs.published[0].payload
    obs.published.append(Published(20.0, TOPIC, again, wall_ms=NOW))
    obs.receipts.append(ReceiptSent(20.1, 1, _digest(again), "duplicate"))
    verdict = _by_check(run_checks(obs))["receipt_handling"]
    assert verdict.status == "fail"
    assert "seq 1 published again" in verdict.reasons[0]


def test_a_receipt_sent_while_the_meter_was_away_counts_from_its_return(key: PrivateKey) -> None:
    """The worker receipts seq 3 at 10.6 s, after the outage but before the meter's
    reconnect at 14.0 s; the meter publishes its outbox on reconnecting, before it can
    read the receipt queued for it. That copy is no defect; one 2 s later is."""
    obs = _live(key)
    p3 = obs.published[3].payload
    obs.connects[1] = Connected(14.0, METER, "5", False, 30)
    obs.subscribes[1] = Subscribed(14.0, METER, f"meters/{METER}/receipts", 1)
    obs.published[3] = Published(10.5, TOPIC, p3, wall_ms=NOW)  # queued for the kit
    obs.receipts[2] = ReceiptSent(10.6, 3, _digest(p3), "accepted")
    obs.published.insert(4, Published(14.0, TOPIC, p3, wall_ms=NOW))
    assert _by_check(run_checks(obs))["receipt_handling"].status == "pass"
    obs.published.insert(5, Published(16.5, TOPIC, p3, wall_ms=NOW))
    verdict = _by_check(run_checks(obs))["receipt_handling"]
    assert verdict.status == "fail"
    assert "seq 3 published again 2.5 s after its receipt" in verdict.reasons[0]


def test_broker_log_lines_parse() -> None:
    connect = parse_log_line(
        1.5,
        "2026-12-04T04:38:01: New client connected from 127.0.0.1:49021 as m1 "
        "(p5, c0, k30, u'm1').",
    )
    assert connect == Connected(1.5, "m1", "5", clean_start=False, keepalive_s=30)
    old = parse_log_line(2.0, "x: New client connected from ::1:4 as m2 (p2, c1, k0, u'm2').")
    assert old == Connected(2.0, "m2", "3.1.1", clean_start=True, keepalive_s=0)
    assert parse_log_line(3.0, "2026-12-04T04:38:02: m1 1 meters/m1/receipts") == Subscribed(
        3.0, "m1", "meters/m1/receipts", 1
    )
    assert parse_log_line(4.0, "2026-12-04T04:38:02: Client m1 disconnected.") is None


def _capture_dir(tmp_path: Path, key: PrivateKey, payloads: list[bytes]) -> tuple[Path, Path]:
    folder = tmp_path / "capture"
    folder.mkdir()
    for i, p in enumerate(payloads):
        (folder / f"{i:04d}.json").write_bytes(p)
    pem = tmp_path / "key.pem"
    pem.write_text(key.public_key().pem(), encoding="ascii")
    return folder, pem


def test_capture_command_passes_and_fails(tmp_path: Path, key: PrivateKey) -> None:
    good, pem = _capture_dir(tmp_path, key, [_payload(key, s) for s in (1, 2)])
    ok = CliRunner().invoke(main, ["conformance", "capture", str(good), "--public-key", str(pem)])
    assert ok.exit_code == 0, ok.output
    assert "CONFORMANT" in ok.output
    (good / "0002.json").write_bytes(_payload(key, 3).replace(b'"v":1', b'"v":1.0'))
    bad = CliRunner().invoke(
        main, ["conformance", "capture", str(good), "--public-key", str(pem), "--json"]
    )
    assert bad.exit_code == 1
    report = json.loads(bad.stdout)
    assert not report["passed"]
    assert [c["check"] for c in report["checks"] if c["status"] == "fail"] == ["strict_json"]


def test_capture_with_an_rsa_key_needs_alg(tmp_path: Path) -> None:
    rsa = generate_private_key(Alg.PS256, rsa_bits=2048)
    folder, pem = _capture_dir(tmp_path, rsa, [_payload(rsa, 1)])
    args = ["conformance", "capture", str(folder), "--public-key", str(pem)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "--alg" in result.output
    assert CliRunner().invoke(main, [*args, "--alg", "PS256"]).exit_code == 0


# Live runs: a private broker each, on free ports, so they can run side by side.

REFERENCE = (
    f"{sys.executable} -P -m meterproof meter run "
    '--meter-id "$METERPROOF_CONFORMANCE_METER_ID" --interval 1 --republish-after 2 '
    '--state-dir "$METERPROOF_CONFORMANCE_STATE_DIR"'
)
SHORT = ["--normal", "3", "--silence", "5", "--outage", "5", "--power-cut", "4",
         "--reconnect-wait", "12"]  # fmt: skip


def _kit(command: str, run_dir: Path, *extra: str) -> tuple[int, dict[str, object]]:
    result = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "meterproof",
            "conformance",
            "meter",
            "--json",
            "--run-dir",
            str(run_dir),
            *SHORT,
            *extra,
            "--command",
            command,
        ],
        capture_output=True,
        timeout=180,
        check=False,
        cwd=run_dir.parent,
    )
    assert result.stdout, result.stderr.decode()
    return result.returncode, json.loads(result.stdout)


@pytest.mark.slow
def test_the_reference_meter_conforms_with_the_kits_certificate_and_with_its_vendors(
    tmp_path: Path,
) -> None:
    """Two runs side by side, each on its own stack: the kit's own identity, and one of a
    separately made vendor CA, which the kit's broker trusts for that run (its CN is the
    meter id)."""
    acme = VendorCa.create(tmp_path / "acme")
    cert, key = acme.issue(tmp_path / "devices", "acme-meter-7")
    vendor = ["--vendor-cert", str(cert), "--vendor-ca", str(acme.path), "--vendor-key", str(key)]
    runs: dict[str, list[str]] = {"kit": [], "vendor": vendor}

    def run(name: str) -> tuple[int, dict[str, object]]:
        return _kit(REFERENCE, tmp_path / name, *runs[name])

    with ThreadPoolExecutor(len(runs)) as pool:
        results = dict(zip(runs, pool.map(run, runs), strict=True))
    for name, (code, report) in results.items():
        checks = cast(list[dict[str, str]], report["checks"])
        assert code == 0, (name, [c for c in checks if c["status"] != "pass"])
        assert report["passed"] is True, name
        # The receipts were the real worker's, after its commits in the run's own database.
        distinct = next(c for c in checks if c["check"] == "seq_ts")
        assert report["readings_stored"], name
        assert report["readings_stored"] == int(distinct["summary"].split()[0]), name
        assert b"broker_subscribed" in (tmp_path / name / "ingest.log").read_bytes()
    assert results["vendor"][1]["meter_id"] == "acme-meter-7"
    log = (tmp_path / "vendor" / "mosquitto" / "mosquitto.log").read_text()
    assert "as acme-meter-7 (p5" in log


#: Each defect of tests/conformance_meters/broken_meter.py and the checks it must fail
#: (a check that cannot judge, like signing_bytes when every alg is wrong, is skipped).
DEFECTS = {
    "wrong-bytes": {"signing_bytes"},
    "float": {"strict_json"},
    "wrong-alg": {"key_binding"},
    "seq-reuse": {"seq_ts"},
    "no-republish": {"republish", "power_cut"},  # nor after a restart
    "tight-reconnect": {"reconnect_backoff", "session"},
    "forgets-state": {"seq_ts", "power_cut"},
}


@pytest.mark.slow
def test_each_broken_meter_is_named_by_its_check(tmp_path: Path) -> None:
    script = ROOT / "tests/conformance_meters/broken_meter.py"

    def run(defect: str) -> tuple[int, dict[str, object]]:
        command = f"{sys.executable} -P {script} --defect {defect}"
        return _kit(command, tmp_path / defect)

    with ThreadPoolExecutor(len(DEFECTS)) as pool:
        results = dict(zip(DEFECTS, pool.map(run, DEFECTS), strict=True))
    for defect, (code, report) in results.items():
        checks = report["checks"]
        failed = {c["check"] for c in checks if c["status"] == "fail"}  # type: ignore[union-attr]
        assert code == 1, defect
        reasons = {c["check"]: c["reasons"] for c in checks if c["status"] == "fail"}  # type: ignore[index]
        assert failed == DEFECTS[defect], (defect, reasons)


#: Defects that normal operation shows, each with the check and the reason naming it.
#: Each passed before: the broker clears the retain flag and lowers the QoS to the
#: subscriber's on delivery, so the kit subscribes to see a reading as it was sent; and
#: the worker receipts every copy, so a copy sent after a receipt is followed by one.
NORMAL_DEFECTS = {
    "retained": ("session", "published retained"),
    "qos2": ("session", "published at QoS 2"),
    "ignores-receipts": ("receipt_handling", "after its receipt"),
}


@pytest.mark.slow
def test_defects_of_normal_operation_are_named(tmp_path: Path) -> None:
    script = ROOT / "tests/conformance_meters/broken_meter.py"
    only_normal = ["--normal", "6", "--silence", "0", "--outage", "0", "--power-cut", "0"]

    def run(defect: str) -> tuple[int, dict[str, object]]:
        command = f"{sys.executable} -P {script} --defect {defect}"
        return _kit(command, tmp_path / defect, *only_normal)

    with ThreadPoolExecutor(len(NORMAL_DEFECTS)) as pool:
        results = dict(zip(NORMAL_DEFECTS, pool.map(run, NORMAL_DEFECTS), strict=True))
    for defect, (code, report) in results.items():
        check, reason = NORMAL_DEFECTS[defect]
        verdicts = cast(list[dict[str, object]], report["checks"])
        verdict = next(v for v in verdicts if v["check"] == check)
        assert code == 1, defect
        assert verdict["status"] == "fail", (defect, verdict)
        assert reason in str(verdict["reasons"]), (defect, verdict)
        failed = {v["check"] for v in verdicts if v["status"] == "fail"}
        assert failed == {check}, (defect, verdicts)


def test_a_reading_signed_anew_is_not_a_republish() -> None:
    ps256 = generate_private_key(Alg.PS256)  # a random salt: each signing gives other bytes
    obs = _live(ps256)
    again = _payload(ps256, 2)
    assert again != obs.published[1].payload
    obs.published[2] = Published(5.0, TOPIC, again, wall_ms=NOW)
    verdict = _by_check(run_checks(obs))["republish"]
    assert verdict.status == "fail"
    assert "seq 2 sent again signed anew" in verdict.reasons[0]


# A vendor's own identity: a certificate of the vendor's CA, which the kit's broker trusts
# for that run only.


def _vendor_refusal(vendor: VendorIdentity, meter_id: str | None = None) -> str:
    with pytest.raises(IdentityRefusedError) as caught:
        accept(vendor, meter_id)
    return caught.value.code


def test_a_vendor_identity_is_accepted_or_refused_with_a_named_reason(tmp_path: Path) -> None:
    acme = VendorCa.create(tmp_path / "acme")
    cert, key = acme.issue(tmp_path / "devices", "acme-0001")
    assert accept(VendorIdentity(cert, acme.path, key), None) == "acme-0001"
    assert accept(VendorIdentity(cert, acme.path), "acme-0001") == "acme-0001"

    other = VendorCa.create(tmp_path / "other", "Other Root CA")
    stranger, stranger_key = other.issue(tmp_path / "other-devices", "acme-0001")
    expired, _ = acme.issue(tmp_path / "old", "acme-0002", days=-1)
    bad_cn, _ = acme.issue(tmp_path / "bad", "acme 0003/..")
    server, _ = acme.issue(tmp_path / "server", "acme-0004", usage=ExtendedKeyUsageOID.SERVER_AUTH)
    leaf_as_ca = VendorCa.create(tmp_path / "leaf", "Not A CA", ca=False)
    before = REGISTRY.get_sample_value(
        "meterproof_conformance_identity_refusals_total", {"reason": "vendor_cert_untrusted"}
    )
    cases = {
        "vendor_cert_untrusted": VendorIdentity(stranger, acme.path),
        "vendor_cert_expired": VendorIdentity(expired, acme.path),
        "vendor_cert_bad_cn": VendorIdentity(bad_cn, acme.path),
        "vendor_cert_not_client": VendorIdentity(server, acme.path),
        "vendor_key_mismatch": VendorIdentity(cert, acme.path, stranger_key),
        "vendor_ca_not_ca": VendorIdentity(cert, leaf_as_ca.path),
        "vendor_cert_unreadable": VendorIdentity(acme.path.parent / "missing.pem", acme.path),
    }
    assert {code: _vendor_refusal(v) for code, v in cases.items()} == {c: c for c in cases}
    assert (
        _vendor_refusal(VendorIdentity(cert, acme.path), "acme-9999") == "vendor_cert_cn_mismatch"
    )
    after = REGISTRY.get_sample_value(
        "meterproof_conformance_identity_refusals_total", {"reason": "vendor_cert_untrusted"}
    )
    assert (after or 0) == (before or 0) + 1

    args = ["conformance", "meter", "--command", "true", "--run-dir", str(tmp_path / "run"),
            "--vendor-cert", str(stranger), "--vendor-ca", str(acme.path)]  # fmt: skip
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2, refused.output
    assert "vendor_cert_untrusted" in refused.output
    assert not (tmp_path / "run" / "mosquitto").exists()  # refused before anything started


def test_a_log_tail_that_never_started_stops_quietly(tmp_path: Path) -> None:
    """A broker that fails to start leaves its log tail unstarted; stopping it in the
    run's cleanup must not raise over the broker's own error (it raised RuntimeError,
    "cannot join thread before it is started", and the port error was lost)."""
    log = tmp_path / "broker.log"
    log.write_text("")
    tail = _LogTail(_Recorder(0.0), log, "m-1")
    tail.stop()
