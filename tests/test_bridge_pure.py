"""The bridge's pure stages with plain values: epochs, the mint rule, entry bytes, rehashing,
backoff, and RFC 6962 roots against the vectors and an independent implementation."""

from __future__ import annotations

import hashlib
import json
import random
from importlib import resources

import pytest
from bridge_harness import rfc6962_root
from hypothesis import given
from hypothesis import strategies as st

from meterproof.backoff import backoff_s
from meterproof.bridge.entry import (
    GENESIS,
    HEADER_SIZE,
    Entry,
    EntryError,
    Header,
    encode_mints,
    entry_json,
    header_from_json,
    seal,
)
from meterproof.bridge.epochs import Epoch, containing, next_epoch
from meterproof.bridge.mint import UNITS_PER_WH, MeterBatch, Mint, advance, format_grid, mint_batch
from meterproof.bridge.rehash import reading_hash
from meterproof.schemas.codec import decode_reading
from meterproof.schemas.merkle import audit_path, merkle_root, verify_inclusion
from meterproof.schemas.reading import OPTIONAL_FIELDS, SignedReading
from meterproof.schemas.signatures import Ed25519Public, generate_private_key
from meterproof.schemas.signing import reading_hash as canonical_hash
from meterproof.schemas.signing import signing_bytes


def fast_hash(r: SignedReading) -> bytes:
    optional = [getattr(r, name) for name in OPTIONAL_FIELDS]
    return reading_hash(r.meter_id, (r.seq, r.ts, r.import_wh, r.export_wh), optional)


# ---------------------------------------------------------------------------------------
# epochs
# ---------------------------------------------------------------------------------------


def test_epochs_align_to_the_wall_clock() -> None:
    quarter = 900_000
    e = containing(1_767_225_600_000 + 14 * 60_000, quarter)  # 2026-01-01 00:14 UTC
    assert (e.start_ms, e.end_ms) == (1_767_225_600_000, 1_767_225_600_000 + quarter)
    assert not e.due(e.end_ms + 29_999, 30_000)
    assert e.due(e.end_ms + 30_000, 30_000)


def test_a_new_batch_never_opens_an_epoch_before_the_previous_one_ended() -> None:
    # oldest unclaimed reading is late (epoch 10), the previous batch was epoch 12
    assert next_epoch(previous_end_ms=13_000, oldest_unclaimed_ms=10_500, length_ms=1000) == Epoch(
        13, 1000
    )
    assert next_epoch(previous_end_ms=13_000, oldest_unclaimed_ms=20_100, length_ms=1000) == Epoch(
        20, 1000
    )
    # the length changed from 7 s to 5 s: start at the first 5 s epoch after the old end
    assert next_epoch(previous_end_ms=14_000, oldest_unclaimed_ms=0, length_ms=5000) == Epoch(
        3, 5000
    )
    assert next_epoch(previous_end_ms=None, oldest_unclaimed_ms=4_200, length_ms=1000) == Epoch(
        4, 1000
    )


# ---------------------------------------------------------------------------------------
# minting
# ---------------------------------------------------------------------------------------


def test_first_batch_mints_from_the_first_reading_and_never_negative() -> None:
    state, exp, imp = advance(MeterBatch("m", 100, 50, 130, 55), None, batch=1)
    assert (exp, imp) == (30, 5)
    assert (state.baseline_export_wh, state.max_export_wh) == (100, 130)
    # a late batch whose readings are all below what was anchored mints nothing
    state, exp, imp = advance(MeterBatch("m", 90, 40, 120, 50), state, batch=2)
    assert (exp, imp) == (0, 0)
    assert state.max_export_wh == 130
    state, exp, _ = advance(MeterBatch("m", 125, 50, 131, 56), state, batch=3)
    assert exp == 1
    assert (state.first_batch, state.last_batch) == (1, 3)


def test_mint_list_holds_changed_meters_by_id_with_their_wallets() -> None:
    aggs = [MeterBatch("b", 5, 5, 5, 5), MeterBatch("a", 0, 0, 2, 0), MeterBatch("c", 0, 0, 0, 9)]
    mints, states = mint_batch(7, aggs, {}, {"a": "w1", "c": None})
    assert mints == [Mint("a", "w1", 2, 0), Mint("c", None, 0, 9)]
    assert set(states) == {"a", "b", "c"}
    assert mints[0].units == 2 * 10**15


@given(st.lists(st.integers(0, 50), min_size=1, max_size=40), st.integers(1, 6), st.randoms())
def test_total_minted_is_max_minus_baseline_whatever_the_arrival(
    increments: list[int], batches: int, rnd: random.Random
) -> None:
    """Readings of one meter (registers rise with ts) arrive shuffled, with duplicates, split
    into batches; each batch is aggregated like the claim statement does."""
    exports = [sum(increments[: i + 1]) for i in range(len(increments))]
    arrivals = [*range(len(exports)), *rnd.choices(range(len(exports)), k=len(exports) // 3)]
    rnd.shuffle(arrivals)
    cuts = sorted(rnd.sample(range(1, len(arrivals) + 1), min(batches, len(arrivals))))
    state, minted, start, first_anchored = None, 0, 0, None
    for batch, end in enumerate(cuts, start=1):
        chunk = sorted(set(arrivals[start:end]))  # a duplicate is stored once: `seen` by seq
        start = end
        if not chunk:
            continue
        first_anchored = exports[chunk[0]] if first_anchored is None else first_anchored
        agg = MeterBatch("m", exports[chunk[0]], 0, max(exports[i] for i in chunk), 0)
        state, exp, _ = advance(agg, state, batch)
        assert exp >= 0
        minted += exp
    assert state is not None
    anchored = set(arrivals[: cuts[-1]])
    assert minted == max(exports[i] for i in anchored) - first_anchored


def test_grid_amounts_print_exactly() -> None:
    assert format_grid(1500 * UNITS_PER_WH) == "1.5"
    assert format_grid(0) == "0"
    assert format_grid(1) == "0.000000000000000001"
    assert format_grid((2**64 - 1) * UNITS_PER_WH) == "18446744073709551.615"


# ---------------------------------------------------------------------------------------
# entries
# ---------------------------------------------------------------------------------------


def _entry(mints: list[Mint]) -> tuple[Entry, bytes]:
    key = generate_private_key("EdDSA")
    public = key.public_key()
    assert isinstance(public, Ed25519Public)
    entry = seal(
        batch=3,
        epoch=1_963_584,
        epoch_ms=900_000,
        prev_hash=bytes(range(32)),
        merkle_root=b"\xaa" * 32,
        reading_count=1000,
        mints=mints,
        oracle=key,
        oracle_key=public.raw,
    )
    return entry, public.raw


def test_header_bytes_follow_the_documented_layout() -> None:
    mints = [Mint("a", "w", 1500, 20), Mint("b", None, 0, 7)]
    entry, oracle_key = _entry(mints)
    raw = entry.header.encode()
    assert len(raw) == HEADER_SIZE == 164
    assert raw[:4] == b"MPL1"
    assert int.from_bytes(raw[4:12], "big") == 3
    assert int.from_bytes(raw[12:20], "big") == 1_963_584
    assert int.from_bytes(raw[20:28], "big") == 900_000
    assert raw[28:60] == bytes(range(32))
    assert raw[60:92] == b"\xaa" * 32
    assert int.from_bytes(raw[92:100], "big") == 1000
    assert raw[100:132] == hashlib.sha256(encode_mints(mints)).digest()
    assert raw[132:164] == oracle_key
    assert entry.header.entry_hash == hashlib.sha256(raw).digest()
    assert entry.header.idempotency_key == f"1963584:3:{'aa' * 32}"
    assert Header.decode(raw) == entry.header
    assert entry.problem() is None


def test_mint_list_bytes_follow_the_documented_layout() -> None:
    blob = encode_mints([Mint("ab", "w1", 2, 3), Mint("c", None, 0, 1)])
    units = (2 * 10**15).to_bytes(32, "big")
    first = b"\x02ab\x02w1" + (2).to_bytes(8, "big") + (3).to_bytes(8, "big") + units
    second = b"\x01c\x00" + bytes(8) + (1).to_bytes(8, "big") + bytes(32)
    assert blob == b"MPM1" + (2).to_bytes(8, "big") + first + second


def test_a_changed_mint_or_header_breaks_the_entry() -> None:
    entry, _ = _entry([Mint("a", "w", 10, 0)])
    forged = Entry(entry.header, entry.signature, (Mint("a", "w", 11, 0),))
    assert forged.problem() == "the mint list does not hash to the header's mint_hash"
    bumped = Header(**{**_fields(entry.header), "reading_count": 1001})
    assert Entry(bumped, entry.signature, entry.mints).problem() == (
        "the oracle signature over the header does not verify"
    )
    with pytest.raises(EntryError, match="magic"):
        Header.decode(b"XXXX" + entry.header.encode()[4:])


def _fields(h: Header) -> dict[str, object]:
    return {name: getattr(h, name) for name in Header.__slots__}


def test_json_view_round_trips_only_when_the_header_matches() -> None:
    entry, _ = _entry([])
    view = entry_json(entry)
    assert header_from_json(view) == entry.header
    assert view["prev_entry_hash"] != GENESIS.hex()
    with pytest.raises(EntryError, match="do not encode"):
        header_from_json({**view, "reading_count": 999})


# ---------------------------------------------------------------------------------------
# rehashing and Merkle roots
# ---------------------------------------------------------------------------------------


def _vectors() -> list[SignedReading]:
    data = json.loads(
        resources.files("meterproof.schemas").joinpath("vectors/signed-readings.json").read_text()
    )
    return [decode_reading(v["payload"].encode()) for k in data["keys"] for v in k["vectors"]]


def test_fast_rehash_equals_the_contract_on_the_spec_vectors() -> None:
    readings = _vectors()
    assert readings
    for r in readings:
        assert fast_hash(r) == canonical_hash(signing_bytes(r))


@pytest.mark.slow
@given(
    meter_id=st.from_regex(r"\A[A-Za-z0-9._-]{1,64}\Z"),
    numbers=st.tuples(*[st.integers(0, 2**64 - 1)] * 4),
    optional=st.lists(st.none() | st.integers(-(2**63), 2**63 - 1), min_size=5, max_size=5),
)
def test_fast_rehash_equals_the_contract_on_random_readings(
    meter_id: str, numbers: tuple[int, int, int, int], optional: list[int | None]
) -> None:
    seq, ts, imp, exp = numbers
    fields = dict(zip(OPTIONAL_FIELDS, optional, strict=True))
    reading = SignedReading.model_validate(
        {
            "v": 1, "meter_id": meter_id, "seq": seq, "ts": ts, "import_wh": imp,
            "export_wh": exp, "alg": "EdDSA", "sig": "AA",
            **{k: v for k, v in fields.items() if v is not None},
        }
    )  # fmt: skip
    assert fast_hash(reading) == canonical_hash(signing_bytes(reading))


def test_roots_match_the_vectors_and_an_independent_rfc6962() -> None:
    data = json.loads(
        resources.files("meterproof.schemas").joinpath("vectors/merkle.json").read_text()
    )
    for tree in data["trees"]:
        leaves = [bytes.fromhex(h) for h in tree["leaves"]]
        assert merkle_root(leaves).hex() == tree["root"] == rfc6962_root(leaves).hex()
    leaves = [hashlib.sha256(str(i).encode()).digest() for i in range(1000)]
    root = merkle_root(leaves)
    assert root == rfc6962_root(leaves)
    for i in (0, 511, 512, 999):
        assert verify_inclusion(leaves[i], i, 1000, audit_path(leaves, i), root)


def test_backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() -> None:
    waits = [backoff_s(n, initial=1, maximum=60, jitter=0.0) for n in range(1, 9)]
    assert waits == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff_s(3, initial=1, maximum=60, jitter=0.999) == pytest.approx(4, rel=1e-3)
