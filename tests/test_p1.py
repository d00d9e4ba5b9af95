"""The DSMR P1 reader's pure parts and `meterproof p1 parse`: every fixture to its
registers and time (a DST change included), the CRC checked against an independent
CRC16 and dsmr_parser, broken, missing-CRC, truncated and noisy input refused and
counted, Smarty decrypted, and the gate that decides what is published."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from dsmr_parser.parsers import TelegramParser
from fixtures.p1.telegrams import (
    SMARTY_KEY,
    Registers,
    crc16,
    dsmr5,
    dsmr22,
    encrypt_smarty,
    fixtures,
    frame,
    smarty,
)
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from meterproof.cli.main import main
from meterproof.meter.measurement import Measurement
from meterproof.meter.outbox import hash_of
from meterproof.meter.p1.reader import (
    Gate,
    JournalEntry,
    P1Reader,
    TelegramJournal,
)
from meterproof.meter.p1.telegram import (
    MAX_TELEGRAM_BYTES,
    Decoded,
    Outcome,
    P1Reading,
    TelegramDecoder,
    Version,
    decode_plain,
)
from meterproof.schemas.codec import sign_reading
from meterproof.schemas.reading import MAX_FUTURE_MS, SignedReading
from meterproof.schemas.signatures import generate_private_key

FIXTURES = Path(__file__).parent / "fixtures" / "p1"
WINTER_MS = int(datetime(2026, 3, 15, 13, 30, tzinfo=UTC).timestamp() * 1000)


def decode_all(data: bytes, **options: object) -> tuple[list[Decoded], int]:
    decoder = TelegramDecoder(**options)  # type: ignore[arg-type]
    return decoder.feed(data) + decoder.finish(), decoder.garbage_bytes


def only_reading(name: str) -> P1Reading:
    [decoded], garbage = decode_all((FIXTURES / name).read_bytes())
    assert (decoded.outcome, garbage) == (Outcome.ACCEPTED, 0), decoded.detail
    assert decoded.reading is not None
    return decoded.reading


def test_the_fixture_files_are_what_the_generator_writes() -> None:
    made = fixtures()
    on_disk = {p.name for p in FIXTURES.iterdir() if p.suffix in (".txt", ".hex")}
    assert on_disk == set(made)
    for name, contents in made.items():
        assert (FIXTURES / name).read_bytes() == contents, name


def test_our_crc16_is_crc16_arc_and_agrees_with_dsmr_parser() -> None:
    assert crc16(b"123456789") == 0xBB3D  # the CRC-16/ARC check value
    for name in ("dsmr42.txt", "dsmr50-three-phase.txt", "emucs-three-phase.txt"):
        raw = (FIXTURES / name).read_bytes()
        body = raw[: raw.index(b"!") + 1]
        assert TelegramParser.crc16(body.decode()) == crc16(body) == int(raw[-6:-2], 16)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dsmr22.txt", P1Reading(Version.V2_2, 440_540 + 392_341, 0, None, 420)),
        (
            "dsmr42.txt",
            P1Reading(
                Version.V4, 4_321_654 + 3_210_987, 12_300 + 45_600, WINTER_MS, 318,
                currents_ma=(1000,),
            ),
        ),
        (
            "dsmr50-single-phase.txt",
            P1Reading(
                Version.V5, 1_581_123 + 1_435_706, 0, WINTER_MS, 412,
                voltages_mv=(231_400,), currents_ma=(2000,),
            ),
        ),
        (
            "dsmr50-three-phase.txt",
            P1Reading(
                Version.V5, 12_345_678 + 10_987_654, 3_456_789 + 2_345_678, WINTER_MS + 10_000,
                -3210, voltages_mv=(229_800, 231_200, 230_500), currents_ma=(4000, 5000, 4000),
            ),
        ),
        (
            "emucs-three-phase.txt",
            P1Reading(
                Version.BELGIUM, 123_456 + 234_567, 12_345 + 1_234, WINTER_MS, -1827,
                voltages_mv=(233_100, 232_800, 234_000), currents_ma=(2620, 2610, 2600),
            ),
        ),
        (
            "smarty-plain.txt",
            P1Reading(
                Version.LUXEMBOURG, 3_116_007, 420_017, WINTER_MS, 532,
                voltages_mv=(234_000,), currents_ma=(2000,),
            ),
        ),
    ],
)  # fmt: skip
def test_every_fixture_parses_to_its_registers_and_time(name: str, expected: P1Reading) -> None:
    assert only_reading(name) == expected


def test_three_phases_sign_the_net_power_of_all_and_l1_voltage_and_current() -> None:
    measurement = only_reading("dsmr50-three-phase.txt").measurement(clock_ms=0)
    assert (measurement.power_w, measurement.voltage_mv, measurement.current_ma) == (
        -3210,
        229_800,
        4000,
    )


def test_the_same_local_time_before_and_after_the_dst_change_is_an_hour_apart() -> None:
    decoded, _ = decode_all((FIXTURES / "dsmr50-dst.txt").read_bytes())
    summer, winter = (d.reading.ts for d in decoded if d.reading is not None)
    assert summer == int(datetime(2026, 10, 25, 0, 30, tzinfo=UTC).timestamp() * 1000)
    assert winter == int(datetime(2026, 10, 25, 1, 30, tzinfo=UTC).timestamp() * 1000)


def test_a_telegram_without_time_takes_the_reader_clock() -> None:
    reading = only_reading("dsmr22.txt")
    assert reading.ts is None
    assert reading.measurement(clock_ms=1_234).ts == 1_234
    assert only_reading("dsmr42.txt").measurement(clock_ms=1_234).ts == WINTER_MS


@pytest.mark.parametrize(
    ("name", "outcomes", "garbage"),
    [
        ("broken-crc.txt", [Outcome.CRC_MISMATCH], 0),
        ("missing-crc.txt", [Outcome.CRC_MISSING], 0),
        ("truncated.txt", [Outcome.TRUNCATED, Outcome.ACCEPTED], 0),
        ("garbage.txt", [Outcome.ACCEPTED, Outcome.ACCEPTED], 15 + 11),
    ],
)
def test_broken_truncated_and_noisy_input_is_refused_and_counted(
    name: str, outcomes: list[Outcome], garbage: int
) -> None:
    decoded, skipped = decode_all((FIXTURES / name).read_bytes())
    assert [d.outcome for d in decoded] == outcomes
    assert skipped == garbage
    assert all(d.reading is None for d in decoded if d.outcome is not Outcome.ACCEPTED)


@pytest.mark.parametrize("name", ["garbage.txt", "truncated.txt", "dsmr50-dst.txt"])
def test_reads_of_any_size_frame_the_same_telegrams(name: str) -> None:
    data = (FIXTURES / name).read_bytes()
    whole, garbage = decode_all(data)
    rng = random.Random(name)
    for _ in range(20):
        decoder = TelegramDecoder()
        pieces: list[Decoded] = []
        at = 0
        while at < len(data):
            step = rng.randint(1, 64)
            pieces += decoder.feed(data[at : at + step])
            at += step
        assert pieces + decoder.finish() == whole
        assert decoder.garbage_bytes == garbage


def test_a_stream_that_ends_or_overflows_inside_a_telegram_is_truncated() -> None:
    good = (FIXTURES / "dsmr50-single-phase.txt").read_bytes()
    assert [d.outcome for d in decode_all(good[:-3])[0]] == [Outcome.TRUNCATED]
    line = b"1-0:1.8.1(000001.000*kWh)\r\n"
    endless = b"/" + line * (MAX_TELEGRAM_BYTES // len(line) + 1)
    decoder = TelegramDecoder()
    assert [d.outcome for d in decoder.feed(endless)] == [Outcome.TRUNCATED]
    assert [d.outcome for d in decoder.feed(good)] == [Outcome.ACCEPTED]


@pytest.mark.parametrize("lost", [2, 4], ids=["crlf", "crc-digits-and-crlf"])
def test_a_telegram_cut_in_its_last_line_does_not_swallow_the_next(lost: int) -> None:
    first, second = dsmr5("260315143000W"), dsmr5("260315143010W")
    decoded, garbage = decode_all(first[:-lost] + second)
    assert [d.outcome for d in decoded] == [Outcome.TRUNCATED, Outcome.ACCEPTED]
    assert decoded[1].sha256 == decode_plain(second).sha256
    assert garbage == 0


def test_a_crc_is_checked_whenever_present_and_required_from_dsmr4_on() -> None:
    old = dsmr22()
    with_bad_crc = old[:-2] + b"0000\r\n"
    assert decode_plain(with_bad_crc).outcome is Outcome.CRC_MISMATCH
    assert decode_plain(old, Version.V5).outcome is Outcome.CRC_MISSING
    assert decode_plain(old, Version.V2_2).outcome is Outcome.ACCEPTED
    assert decode_plain(old[:-2] + b"12\r\n").outcome is Outcome.CRC_MISMATCH  # not 4 digits


def reframed(old: str, new: str) -> bytes:
    """A DSMR 5 telegram with one line changed and a correct CRC."""
    raw = dsmr5("260315143000W")
    lines = raw.decode().split("\r\n")
    changed = [new if line.startswith(old) else line for line in lines[2:-2]]
    return frame(lines[0][1:], [line for line in changed if line])


@pytest.mark.parametrize(
    ("old", "new", "outcome"),
    [
        ("1-0:1.8.1", "1-0:1.8.1(001581.1234*kWh)", Outcome.UNPARSABLE),  # finer than 1 Wh
        ("1-0:1.8.1", "1-0:1.8.1(001581123*Wh)", Outcome.UNPARSABLE),
        ("1-0:1.8.1", "1-0:1.8.1(0015x1.123*kWh)", Outcome.UNPARSABLE),
        ("1-0:2.8.2", "", Outcome.MISSING_REGISTER),
        ("0-0:1.0.0", "0-0:1.0.0(260315143000X)", Outcome.UNPARSABLE),
        ("1-0:1.7.0", "1-0:1.7.0(00.4125*kW)", Outcome.UNPARSABLE),  # finer than 1 W
        ("1-0:1.8.2", "1-0:1.8.2(-00001.000*kWh)", Outcome.UNPARSABLE),  # the sum is positive
    ],
)
def test_registers_are_exact_in_their_units_or_refused(
    old: str, new: str, outcome: Outcome
) -> None:
    decoded = decode_plain(reframed(old, new))
    assert decoded.outcome is outcome, decoded.detail
    assert decoded.detail


def test_smarty_frames_decrypt_to_the_clear_telegram() -> None:
    sealed = bytes.fromhex((FIXTURES / "smarty-encrypted.hex").read_text())
    [decoded], _ = decode_all(b"\x00noise" + sealed, key=SMARTY_KEY)
    assert decoded.reading == only_reading("smarty-plain.txt")
    wrong = bytes(range(1, 17))
    assert [d.outcome for d in decode_all(sealed, key=wrong)[0]] == [Outcome.DECRYPT_FAILED]
    tampered = bytearray(sealed)
    tampered[40] ^= 0x01
    assert [d.outcome for d in decode_all(bytes(tampered), key=SMARTY_KEY)[0]] == [
        Outcome.DECRYPT_FAILED
    ]


def test_a_smarty_frame_whose_telegram_has_a_bad_crc_is_refused() -> None:
    plain = smarty("260315143000W")
    sealed = encrypt_smarty(plain[:-6] + b"0000\r\n", counter=2)
    [decoded], _ = decode_all(sealed, key=SMARTY_KEY)
    assert decoded.outcome is Outcome.CRC_MISMATCH


def test_a_key_is_16_bytes_and_only_for_smarty() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        TelegramDecoder(key=b"short")
    with pytest.raises(ValueError, match="Smarty"):
        TelegramDecoder(version=Version.V5, key=SMARTY_KEY)


def m(ts: int, imp: int = 100, exp: int = 0) -> Measurement:
    return Measurement(ts=ts, import_wh=imp, export_wh=exp)


def test_the_gate_publishes_one_reading_per_interval_never_going_backwards() -> None:
    gate = Gate(interval_ms=10_000)
    now = 1_010_000
    assert gate.admit(m(1_000_000), now_ms=now) is Outcome.ACCEPTED
    assert gate.admit(m(1_005_000, 101), now_ms=now) is Outcome.THINNED
    assert gate.admit(m(999_000, 102), now_ms=now) is Outcome.TIME_BACKWARDS
    assert gate.admit(m(1_010_000, 99), now_ms=now) is Outcome.REGISTER_DECREASED
    assert gate.admit(m(1_010_000, 100, 5), now_ms=now) is Outcome.ACCEPTED
    every = Gate(interval_ms=0)
    assert every.admit(m(1), now_ms=now) is Outcome.ACCEPTED
    assert every.admit(m(1), now_ms=now) is Outcome.THINNED  # the same telegram time again
    assert every.admit(m(2), now_ms=now) is Outcome.ACCEPTED


def test_a_time_too_far_ahead_is_refused_without_holding_back_the_next_readings() -> None:
    # One telegram from a meter clock that jumped forward: the ingest side would refuse it
    # as timestamp_skew; were it the gate's last reading, every correct one after it
    # would be refused as time_backwards until the reader restarts.
    gate = Gate(interval_ms=0)
    now = 1_000_000_000
    assert gate.admit(m(now + MAX_FUTURE_MS + 1), now_ms=now) is Outcome.TIMESTAMP_SKEW
    assert gate.admit(m(now), now_ms=now) is Outcome.ACCEPTED
    assert gate.admit(m(now + MAX_FUTURE_MS, 101), now_ms=now) is Outcome.ACCEPTED  # the bound


def invoke(*args: str) -> tuple[int, list[str], str]:
    result = CliRunner().invoke(main, ["p1", *args])
    return result.exit_code, result.stdout.splitlines(), result.stderr


def test_parse_json_prints_one_object_per_telegram_and_exits_0_if_any_parsed() -> None:
    code, lines, err = invoke("parse", "--json", str(FIXTURES / "truncated.txt"))
    assert code == 0
    refused, accepted = (json.loads(line) for line in lines)
    assert refused["error"] == "truncated"
    assert {k: accepted[k] for k in ("import_wh", "export_wh", "ts", "power_w")} == {
        "import_wh": 3_016_829, "export_wh": 0, "ts": WINTER_MS + 1000, "power_w": 412,
    }  # fmt: skip
    assert "2 telegrams, 1 parsed" in err
    code, lines, _ = invoke("parse", "--json", str(FIXTURES / "dsmr22.txt"))
    assert (code, json.loads(lines[0])["ts"]) == (0, None)


def test_parse_exits_1_when_no_telegram_parsed() -> None:
    code, lines, _ = invoke("parse", "--json", str(FIXTURES / "broken-crc.txt"))
    assert code == 1
    assert json.loads(lines[0])["error"] == "crc_mismatch"


def test_parse_decrypts_a_smarty_recording_with_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recording = tmp_path / "smarty.bin"
    recording.write_bytes(bytes.fromhex((FIXTURES / "smarty-encrypted.hex").read_text()))
    code, lines, _ = invoke("parse", "--json", "--smarty-key", SMARTY_KEY.hex(), str(recording))
    assert code == 0
    assert json.loads(lines[0])["import_wh"] == 3_116_007
    # From the environment, so the key is not on a command line `ps` shows to everyone.
    monkeypatch.setenv("METERPROOF_SMARTY_KEY", SMARTY_KEY.hex())
    code, lines, _ = invoke("parse", "--json", str(recording))
    assert code == 0
    assert json.loads(lines[0])["import_wh"] == 3_116_007
    monkeypatch.delenv("METERPROOF_SMARTY_KEY")
    code, _, err = invoke("parse", "--smarty-key", "abc", str(recording))
    assert code == 2
    assert len(err.strip().splitlines()) == 1


def test_run_needs_exactly_one_source() -> None:
    code, _, err = invoke("run", "--meter-id", "m-1")
    assert code == 2
    assert "exactly one of --serial, --tcp, --file" in err
    code, _, err = invoke("run", "--meter-id", "m-1", "--tcp", "no-port")
    assert code == 2
    assert "HOST:PORT" in err
    code, _, err = invoke("run", "--meter-id", "m-1", "--file", "/nonexistent/p1.txt")
    assert code == 2
    assert "does not exist" in err


EDDSA_IDENTITY = '{"meter_id": "m-1", "alg": "EdDSA"}'


@pytest.mark.parametrize(
    ("meta", "key_alg", "mode", "blamed"),
    [
        ('{"meter_id": "m-1", "alg": "HS256"}', "EdDSA", 0o600, "identity.json"),
        ('{"meter_id": "m-1"}', "EdDSA", 0o600, "identity.json"),
        ('["m-1"]', "EdDSA", 0o600, "identity.json"),
        ('{"meter_id": "m-1", "alg": "ES256"}', "EdDSA", 0o600, "signing.key"),
        (EDDSA_IDENTITY, None, 0o600, "signing.key"),
        (EDDSA_IDENTITY, "EdDSA", 0o640, "signing.key"),  # a copy made with umask 027
        (EDDSA_IDENTITY, "EdDSA", 0o604, "signing.key"),
    ],
)
def test_a_damaged_or_shared_reader_identity_is_one_line_and_exit_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    meta: str,
    key_alg: str | None,
    mode: int,
    blamed: str,
) -> None:
    device = tmp_path / "pki" / "devices" / "m-1"
    device.mkdir(parents=True)
    (device / "identity.json").write_text(meta)
    (device / "signing.key").write_bytes(
        generate_private_key(key_alg).pem() if key_alg else b"not a key"
    )
    (device / "signing.key").chmod(mode)
    (device / "tls.key").touch(0o600)
    monkeypatch.setenv("METERPROOF_PKI_ROOT", str(tmp_path / "pki"))
    monkeypatch.setenv("METERPROOF_RUN_DIR", str(tmp_path / "run"))
    stack_env = tmp_path / "stack.env"
    stack_env.touch()
    recording = FIXTURES / "dsmr22.txt"
    for args in (["run", "--file", str(recording)], ["pair"]):
        code, _, err = invoke(*args, "--meter-id", "m-1", "--stack-env", str(stack_env))
        assert code == 2, err
        assert err.startswith(f"Error: {device / blamed}: ")
        assert len(err.strip().splitlines()) == 1


def test_registers_stay_exact_where_a_float_would_not() -> None:
    # 0.1 + 0.2 kWh in binary floating point is 300.00000000000006 Wh.
    regs = Registers(t1="000000.100", t2="000000.200")
    [decoded], _ = decode_all(dsmr5("260315143000W", regs))
    assert decoded.reading is not None
    assert decoded.reading.import_wh == 300


class StubClient:
    """The three calls the reader makes of a `MeterClient`, signing for real."""

    meter_id = "p1-stub"

    def __init__(self) -> None:
        self.key = generate_private_key("EdDSA")
        self.sent: list[SignedReading] = []

    def reserve_seq(self) -> int:
        return len(self.sent) + 1

    def sign(self, seq: int, measurement: Measurement) -> SignedReading:
        fields = {"meter_id": self.meter_id, "seq": seq, **measurement.fields()}
        return sign_reading(fields, self.key)

    def send(self, reading: SignedReading) -> None:
        self.sent.append(reading)


def counted(outcome: Outcome) -> float:
    value = REGISTRY.get_sample_value("meterproof_p1_telegrams_total", {"outcome": outcome})
    return value or 0.0


def test_the_reader_counts_every_outcome_and_journals_each_published_telegram(
    tmp_path: Path,
) -> None:
    client = StubClient()
    journal = TelegramJournal(tmp_path / "journal.jsonl", durable=False)
    reader = P1Reader(client, TelegramDecoder(), journal, interval_s=0, clock=lambda: WINTER_MS)  # type: ignore[arg-type]
    before = {o: counted(o) for o in Outcome}
    garbage_before = REGISTRY.get_sample_value("meterproof_p1_garbage_bytes_total") or 0.0
    stream = [(FIXTURES / n).read_bytes() for n in ("garbage.txt", "broken-crc.txt", "dsmr22.txt")]
    for data in stream:
        reader.take(data)
    reader.take(b"/cut short")
    reader.end_of_stream()
    # garbage.txt's two telegrams, then dsmr22 (the reader's clock: earlier than the last)
    assert reader.stats.outcomes == {
        "accepted": 2, "crc_mismatch": 1, "time_backwards": 1, "truncated": 1,
    }  # fmt: skip
    assert {o: counted(o) - before[o] for o in Outcome if counted(o) != before[o]} == {
        Outcome.ACCEPTED: 2, Outcome.CRC_MISMATCH: 1, Outcome.TIME_BACKWARDS: 1,
        Outcome.TRUNCATED: 1,
    }  # fmt: skip
    assert REGISTRY.get_sample_value("meterproof_p1_garbage_bytes_total") == garbage_before + 26
    telegram_hashes = [
        decode_plain(t).sha256 for t in split_telegrams((FIXTURES / "garbage.txt").read_bytes())
    ]
    assert journal.entries() == [
        JournalEntry(r.seq, hash_of(r), digest, r.ts)
        for r, digest in zip(client.sent, telegram_hashes, strict=True)
    ]


def split_telegrams(data: bytes) -> list[bytes]:
    return [b"/" + part[: part.index(b"!") + 7] for part in data.split(b"/")[1:]]


def test_a_register_beyond_the_signed_range_is_refused_and_the_reader_goes_on(
    tmp_path: Path,
) -> None:
    # A meter may print more digits than a u64/i64 holds; signing such a reading fails,
    # which must cost this telegram, not the reader.
    client = StubClient()
    journal = TelegramJournal(tmp_path / "journal.jsonl", durable=False)
    reader = P1Reader(client, TelegramDecoder(), journal, interval_s=0)  # type: ignore[arg-type]
    too_big = [
        Registers(t1="99999999999999999999.999"),
        Registers(t1="9" * 5000 + ".000"),  # past int-to-str's limit for the detail too
        Registers(power_in="9999999999999999999999.000"),
        Registers(power_in="9223372036854775.807", power_out="-00000.001"),  # i64 max + 1
    ]
    for second, regs in enumerate(too_big):
        reader.take(dsmr5(f"26031514300{second}W", regs))
    reader.take(dsmr5("260315143009W"))
    assert reader.stats.outcomes == {"unparsable": 4, "accepted": 1}
    assert [reading.ts for reading in client.sent] == [WINTER_MS + 9000]


def _entry(seq: int) -> JournalEntry:
    return JournalEntry(seq, f"{seq:064x}", f"{seq + 100:064x}", 1_000 * seq)


def test_a_journal_line_torn_by_a_power_cut_costs_that_line_only(tmp_path: Path) -> None:
    path = tmp_path / "p1-telegrams.jsonl"
    journal = TelegramJournal(path, durable=False)
    journal.record(_entry(1))
    whole = len(path.read_bytes())
    journal.record(_entry(2))
    with path.open("r+b") as cut:  # the power went during seq 2's append
        cut.truncate(whole + 40)
    with capture_logs() as logs:
        journal.record(_entry(3))
        assert journal.entries() == [_entry(1), _entry(3)]
    assert len(path.read_bytes().splitlines()) == 3  # seq 3 on a line of its own
    events = {e["event"]: e for e in logs}
    assert "p1.journal_torn_line" in events
    assert (
        events["p1.journal_lines_skipped"]["count"],
        events["p1.journal_lines_skipped"]["lines"],
    ) == (1, [2])
