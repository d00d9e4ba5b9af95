"""The meter's pure parts with plain values: curves, seq state, outbox, delivery rules,
misbehaviours, fleet arithmetic. No broker here; see test_meter_client for that."""

from __future__ import annotations

import errno
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterproof.meter.delivery import Delivery, TokenBucket
from meterproof.meter.fleet import parse_alg_mix, split_counts
from meterproof.meter.measurement import Measurement
from meterproof.meter.misbehave import (
    EXPECTED,
    Misbehaviour,
    corrupt_signature,
    roll_back,
    skew_clock,
)
from meterproof.meter.outbox import Outbox, OutboxError
from meterproof.meter.profile import DAY_MS, HOUR_MS, Profile, profile_for
from meterproof.meter.simulate import (
    EXIT_OK,
    EXIT_UNEXPECTED,
    EXIT_UNRECEIPTED,
    FleetConfig,
    FleetSummary,
)
from meterproof.meter.state import FIRST_SEQ, SeqState, StateError
from meterproof.schemas.codec import decode_reading, sign_reading
from meterproof.schemas.reading import (
    Alg,
    ReceiptStatus,
    RejectReason,
    SignedReading,
    b64url_decode,
)
from meterproof.schemas.signatures import generate_private_key
from meterproof.schemas.signing import signing_bytes

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
KEY = generate_private_key(Alg.EDDSA)


def _reading(seq: int, *, import_wh: int = 1000, ts: int = NOW_MS) -> SignedReading:
    fields = {"meter_id": "m-1", "seq": seq, "ts": ts, "import_wh": import_wh, "export_wh": 0}
    return sign_reading(fields, KEY)


# --- household curves -----------------------------------------------------------------


@given(
    meter_id=st.text("abcdef0123456789-", min_size=1, max_size=20),
    start=st.integers(NOW_MS - 400 * DAY_MS, NOW_MS + 400 * DAY_MS),
    steps=st.lists(st.integers(0, 2 * DAY_MS), min_size=1, max_size=40),
)
def test_registers_never_decrease(meter_id: str, start: int, steps: list[int]) -> None:
    profile = profile_for(meter_id)
    previous = profile.registers_at(start)
    ts = start
    for step in steps:
        ts += step
        current = profile.registers_at(ts)
        assert current[0] >= previous[0]
        assert current[1] >= previous[1]
        previous = current


def test_registers_are_continuous_across_midnight_and_start_at_installation() -> None:
    profile = profile_for("m-midnight", prosumer_share=1.0)
    local_midnight = NOW_MS + DAY_MS - profile.utc_offset_h * HOUR_MS
    before = profile.registers_at(local_midnight - 1)
    after = profile.registers_at(local_midnight + 1)
    assert 0 <= after[0] - before[0] <= 1
    assert profile.registers_at(profile.installed_ms) == (0, 0)
    assert profile.registers_at(profile.installed_ms - DAY_MS) == (0, 0)


def test_prosumers_export_around_midday_and_consumers_only_import() -> None:
    household = {"base_w": 200, "morning_w": 500, "evening_w": 1500, "installed_ms": 0}
    prosumer = Profile(**household, pv_peak_w=5000, utc_offset_h=9)
    consumer = Profile(**household, pv_peak_w=0, utc_offset_h=9)
    hour = HOUR_MS
    noon = NOW_MS + 12 * hour - 9 * hour  # local noon in UTC+9
    noon_delta = _delta(prosumer, noon, noon + hour)
    assert noon_delta[1] > 1000  # a 5 kWp roof exports kWh-scale around noon
    evening = noon + 8 * hour  # after sunset both households only draw from the grid
    prosumer_evening = _delta(prosumer, evening, evening + hour)
    consumer_evening = _delta(consumer, evening, evening + hour)
    assert prosumer_evening[1] == consumer_evening[1] == 0
    assert abs(prosumer_evening[0] - consumer_evening[0]) <= 1  # whole-Wh rounding
    day = _delta(consumer, NOW_MS, NOW_MS + DAY_MS)
    assert day[1] == 0
    assert 4_000 < day[0] < 40_000  # a household's daily import, in Wh


def _delta(profile: Profile, t0: int, t1: int) -> tuple[int, int]:
    a, b = profile.registers_at(t0), profile.registers_at(t1)
    return b[0] - a[0], b[1] - a[1]


def test_same_meter_same_household_and_plausible_measurement() -> None:
    assert profile_for("m-7") == profile_for("m-7")
    measurement = profile_for("m-7").measure(NOW_MS, random.Random(1))
    assert measurement.ts == NOW_MS
    assert 200_000 < (measurement.voltage_mv or 0) < 260_000
    assert 49_500 < (measurement.frequency_mhz or 0) < 50_500
    assert set(measurement.fields()) >= {"ts", "import_wh", "export_wh", "power_w"}


def test_the_fleet_spans_time_zones_so_someone_exports_at_any_hour() -> None:
    profiles = [profile_for(f"m-{n}", prosumer_share=1.0) for n in range(200)]
    assert len({p.utc_offset_h for p in profiles}) > 12
    for hour in range(0, 24, 3):
        t0 = NOW_MS + hour * HOUR_MS
        assert any(_delta(p, t0, t0 + HOUR_MS)[1] > 0 for p in profiles)


def test_profile_rejects_impossible_values() -> None:
    with pytest.raises(ValueError, match="negative"):
        Profile(base_w=-1, morning_w=0, evening_w=0, pv_peak_w=0, installed_ms=0)
    with pytest.raises(ValueError, match="time zone"):
        Profile(base_w=1, morning_w=0, evening_w=0, pv_peak_w=0, installed_ms=0, utc_offset_h=20)
    with pytest.raises(ValueError, match="prosumer_share"):
        profile_for("m", prosumer_share=1.5)


# --- seq state --------------------------------------------------------------------------


def test_seq_state_persists_the_next_seq_before_handing_one_out(tmp_path: Path) -> None:
    state = SeqState(tmp_path / "state.json")
    assert state.take() == FIRST_SEQ
    assert json.loads((tmp_path / "state.json").read_text()) == {"next_seq": FIRST_SEQ + 1}
    assert state.take() == FIRST_SEQ + 1
    again = SeqState(tmp_path / "state.json")
    assert again.take() == FIRST_SEQ + 2
    assert not list(tmp_path.glob("*.tmp"))


def test_seq_blocks_leave_a_gap_after_restart_never_a_reuse(tmp_path: Path) -> None:
    state = SeqState(tmp_path / "state.json", durable=False, block=10)
    taken = [state.take() for _ in range(3)]
    assert json.loads((tmp_path / "state.json").read_text()) == {"next_seq": FIRST_SEQ + 10}
    after_crash = SeqState(tmp_path / "state.json", durable=False, block=10)
    assert after_crash.take() == FIRST_SEQ + 10 > max(taken)


def test_seq_state_skips_past_seqs_found_elsewhere(tmp_path: Path) -> None:
    state = SeqState(tmp_path / "state.json")
    state.advance_past(41)
    assert state.take() == 42
    state.advance_past(7)
    assert state.take() == 43


@pytest.mark.parametrize("content", ["", "{}", '{"next_seq": -1}', '{"next_seq": "5"}', "[1]"])
def test_unreadable_state_is_refused_rather_than_guessed(tmp_path: Path, content: str) -> None:
    (tmp_path / "state.json").write_text(content)
    with pytest.raises(StateError):
        SeqState(tmp_path / "state.json")


_SHORT_WRITE = """
import resource, signal, sys
from pathlib import Path
from meterproof.meter.files import atomic_write
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))
try:
    atomic_write(Path(sys.argv[1]), b'{"next_seq": 1000000000000}', durable=True)
except OSError as exc:
    sys.exit(exc.errno)
"""


def test_a_write_the_disk_cuts_short_fails_and_keeps_the_old_file(tmp_path: Path) -> None:
    # A file size limit makes os.write return a short count without an error, as a
    # filling disk does; the old state file must stay, whole, and no temp file remain.
    path = tmp_path / "state.json"
    SeqState(path).advance_past(41)
    done = subprocess.run([sys.executable, "-c", _SHORT_WRITE, str(path)], check=False)
    assert done.returncode == errno.EFBIG
    assert SeqState(path).take() == 42
    assert not list(tmp_path.glob("*.tmp"))


# --- outbox -----------------------------------------------------------------------------


def test_outbox_keeps_exact_payloads_until_a_matching_receipt(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox", meter_id="m-1")
    first, second = outbox.add(_reading(2)), outbox.add(_reading(1))
    assert [entry.seq for entry in outbox] == [1, 2]
    assert (tmp_path / "outbox" / f"{2:020d}.json").read_bytes() == first.payload
    assert decode_reading(first.payload) == _reading(2)

    reloaded = Outbox(tmp_path / "outbox", meter_id="m-1")
    assert list(reloaded) == [second, first]
    assert reloaded.settle(2, "0" * 64) is None  # right seq, another reading
    assert reloaded.settle(2, first.reading_hash) == first
    assert reloaded.settle(2, first.reading_hash) is None  # a second receipt
    assert [entry.seq for entry in Outbox(tmp_path / "outbox", meter_id="m-1")] == [1]
    assert reloaded.max_seq() == 1


def test_outbox_refuses_a_second_pending_reading_with_the_same_seq(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox", meter_id="m-1")
    outbox.add(_reading(5))
    with pytest.raises(OutboxError, match="seq 5"):
        outbox.add(_reading(5, import_wh=2000))


def test_outbox_drops_interrupted_writes_and_refuses_foreign_files(tmp_path: Path) -> None:
    directory = tmp_path / "outbox"
    directory.mkdir()
    (directory / f"{3:020d}.json.tmp").write_bytes(b'{"half')
    assert len(Outbox(directory, meter_id="m-1")) == 0
    assert not list(directory.iterdir())
    (directory / f"{3:020d}.json").write_bytes(b"not json")
    with pytest.raises(OutboxError):
        Outbox(directory, meter_id="m-1")


def test_outbox_refuses_another_meters_readings_and_keeps_them(tmp_path: Path) -> None:
    # Loaded by another meter, they would be republished under its certificate, refused
    # as topic_mismatch and deleted by that final receipt.
    directory = tmp_path / "outbox"
    Outbox(directory, meter_id="m-1").add(_reading(7))
    with pytest.raises(OutboxError, match="a reading of meter m-1, not m-2"):
        Outbox(directory, meter_id="m-2")
    assert [entry.seq for entry in Outbox(directory, meter_id="m-1")] == [7]


# --- delivery ---------------------------------------------------------------------------


def _delivery(*, rate: float = 1000.0, inflight: int = 2) -> Delivery:
    return Delivery(
        republish_after=10.0,
        max_republish_after=40.0,
        max_inflight=inflight,
        bucket=TokenBucket(rate=rate, burst=inflight),
    )


def test_delivery_sends_oldest_first_within_the_inflight_window() -> None:
    delivery = _delivery(inflight=2)
    for seq in (3, 1, 2):
        delivery.add(seq)
    delivery.add(1)  # already known: no second copy
    assert delivery.take(0.0) == [1, 2]
    assert delivery.take(0.0) == []  # window full until a PUBACK
    delivery.acked(1, 0.1)
    assert delivery.take(0.1) == [3]
    assert (delivery.queued, delivery.in_flight, delivery.acknowledged) == (0, 2, 1)


def test_delivery_republishes_without_receipt_with_doubling_timeouts() -> None:
    delivery = _delivery()
    delivery.add(7)
    assert delivery.take(0.0) == [7]
    delivery.acked(7, 1.0)
    assert delivery.expire(10.9) == []
    assert delivery.expire(11.0) == [7]
    assert delivery.take(11.0) == [7]
    assert delivery.attempts(7) == 2
    delivery.acked(7, 12.0)
    assert delivery.expire(31.9) == []  # second wait is 20 s
    assert delivery.expire(32.0) == [7]


def test_an_unrouted_reading_is_retried_soon_then_backs_off_to_the_receipt_timeout() -> None:
    delivery = _delivery()  # unrouted retry 1 s by default, receipt timeout 10 s
    delivery.add(5)
    waits = []
    now = 0.0
    for _ in range(6):
        assert delivery.take(now) == [5]
        delivery.acked(5, now, routed=False)  # PUBACK 16: no worker subscription exists
        due = next(t / 10 for t in range(int(now * 10), 1000) if delivery.expire(t / 10))
        waits.append(round(due - now, 1))
        now = due
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_delivery_forgets_a_receipted_reading_wherever_it_is() -> None:
    delivery = _delivery(inflight=1)
    for seq in (1, 2):
        delivery.add(seq)
    assert delivery.take(0.0) == [1]
    delivery.settled(2)  # still queued
    delivery.settled(1)  # in flight
    delivery.acked(1, 0.5)  # a late PUBACK changes nothing
    assert delivery.take(1.0) == []
    assert delivery.expire(100.0) == []
    assert (delivery.queued, delivery.in_flight, delivery.acknowledged) == (0, 0, 0)


def test_publish_rate_is_bounded_by_the_token_bucket() -> None:
    delivery = Delivery(
        republish_after=10.0,
        max_republish_after=10.0,
        max_inflight=100,
        bucket=TokenBucket(rate=2.0, burst=3),
    )
    for seq in range(1, 51):
        delivery.add(seq)
    assert delivery.take(0.0) == [1, 2, 3]  # the burst
    assert delivery.take(0.4) == []
    assert delivery.take(0.5) == [4]  # then 2 per second
    assert len(delivery.take(10.5)) == 3  # idle time refills up to the burst only


def test_delivery_and_bucket_check_their_bounds() -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate=0, burst=1)
    with pytest.raises(ValueError, match="max_inflight"):
        Delivery(
            republish_after=1.0,
            max_republish_after=1.0,
            max_inflight=0,
            bucket=TokenBucket(rate=1.0, burst=1),
        )
    with pytest.raises(ValueError, match="max_republish_after"):
        Delivery(
            republish_after=2.0,
            max_republish_after=1.0,
            max_inflight=1,
            bucket=TokenBucket(rate=1.0, burst=1),
        )


# --- misbehaviours ----------------------------------------------------------------------


def test_corrupted_signature_is_well_formed_but_does_not_verify() -> None:
    good = _reading(1)
    bad = corrupt_signature(good)
    assert decode_reading(bad.model_dump_json(exclude_none=True).encode()) == bad
    assert bad.sig != good.sig
    message = signing_bytes(bad)
    assert message == signing_bytes(good)  # same reading_hash: the receipt still matches
    assert KEY.public_key().verify(b64url_decode(good.sig), message)
    assert not KEY.public_key().verify(b64url_decode(bad.sig), message)


def test_skew_and_rollback_break_exactly_one_rule() -> None:
    now = Measurement(ts=NOW_MS, import_wh=5_000, export_wh=0)
    assert skew_clock(now).ts - NOW_MS > 300_000
    rolled = roll_back(now, _reading(3, import_wh=4_900))
    assert rolled is not None
    assert rolled.import_wh < 4_900
    assert roll_back(now, _reading(3, import_wh=0)) is None


def test_every_misbehaviour_names_the_receipt_it_must_get() -> None:
    assert set(EXPECTED) == set(Misbehaviour)
    for status, reason in EXPECTED.values():
        assert (status is ReceiptStatus.REJECTED) == (reason is not None)
    assert EXPECTED[Misbehaviour.REPLAY] == (ReceiptStatus.DUPLICATE, None)
    assert EXPECTED[Misbehaviour.SEQ_REUSE][1] is RejectReason.SEQ_REUSED


# --- fleet arithmetic and outcome -------------------------------------------------------


def test_alg_mix_is_parsed_normalised_and_split_exactly() -> None:
    mix = parse_alg_mix("EdDSA=4, ES256=1")
    assert mix == {Alg.EDDSA: 0.8, Alg.ES256: 0.2}
    assert split_counts(7, mix) == {Alg.EDDSA: 6, Alg.ES256: 1}
    assert sum(split_counts(101, parse_alg_mix("EdDSA=1,ES256=1,RS256=1")).values()) == 101
    for bad in ("EdDSA=x", "HS256=1", "EdDSA=1,EdDSA=1", "EdDSA=0", "EdDSA=-1"):
        with pytest.raises(ValueError):
            parse_alg_mix(bad)


def _summary(*, unreceipted: int = 0, unexpected: int = 0) -> FleetSummary:
    return FleetSummary(
        meters=2,
        sent=12,
        accepted=10,
        duplicate=1,
        rejected={"bad_signature": 1},
        unreceipted=unreceipted,
        republished=0,
        misbehaved=2,
        caught=2 - unexpected,
        unexpected=unexpected,
        elapsed_s=1.0,
    )


def test_exit_code_says_whether_every_reading_was_receipted_as_intended() -> None:
    assert _summary().exit_code == EXIT_OK
    assert _summary(unreceipted=1).exit_code == EXIT_UNRECEIPTED
    assert _summary(unreceipted=1, unexpected=1).exit_code == EXIT_UNEXPECTED
    data = _summary().to_dict()
    assert data["receipted"] == 12
    assert json.loads(json.dumps(data)) == data
    assert any("caught" in line for line in _summary().lines())


def test_fleet_config_fails_at_start_on_bad_values() -> None:
    with pytest.raises(ValueError, match="misbehave"):
        FleetConfig(misbehave=1.5)
    with pytest.raises(ValueError, match="republish_after"):
        FleetConfig(republish_after_s=0)
