"""`meterproof fuzz` at CI size, and proof that its checker can fail."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from click.testing import CliRunner

from meterproof.fuzz import cli as fuzz_cli
from meterproof.fuzz.checker import MIB
from meterproof.fuzz.cli import run_campaign, run_wire_campaign
from meterproof.fuzz.engines import atheris_available
from meterproof.fuzz.target import SPEC_REASONS, PipelineTarget, load_fleet, unstorable
from meterproof.ingest import _wire
from meterproof.ingest._wire import Drop, Publish
from meterproof.ingest.records import Message, Rejection
from meterproof.schemas.reading import RejectReason


@pytest.mark.slow
def test_a_ci_sized_campaign_keeps_every_invariant() -> None:
    report = run_campaign(payloads=3_000, engine="all", seed=7, echo=False)
    tally = report.tally
    assert tally.inputs >= 3_000
    # atheris is a test dependency on Linux; elsewhere the campaign runs without it.
    atheris = {"atheris"} if atheris_available() else set()
    assert set(tally.engines) == {"vectors", "hypothesis", "mutate", *atheris}
    assert not tally.failures, "\n".join(f.reproducer() for f in tally.examples)
    reasons = {name for name in tally.outcomes if name in SPEC_REASONS}
    assert len(reasons) >= 9, f"the generators reach too few rules: {sorted(tally.outcomes)}"
    assert tally.outcomes["accepted"] > 0
    assert not report.memory_failures(64)


def _broken(kind: str) -> Callable[[Message], object]:
    fleet = load_fleet()
    real = PipelineTarget(fleet)

    def target(message: Message) -> object:
        if b'"seq"' in message.payload and kind == "raise":
            raise KeyError("boom from a broken stage")
        outcome = real(message)
        if kind == "unknown" and isinstance(outcome, Rejection):
            return Rejection(message, "spoofed_reason", "x")  # type: ignore[arg-type]
        if kind == "wrong":
            return Rejection(message, RejectReason.RATE_LIMITED, "everything is a flood")
        return outcome

    return target


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "failure"),
    [("raise", "exception"), ("unknown", "unknown_reason"), ("wrong", "unexpected")],
)
def test_the_checker_catches_a_broken_target(kind: str, failure: str) -> None:
    report = run_campaign(
        payloads=300, engine="hypothesis", seed=3, target=_broken(kind), echo=False
    )
    assert report.tally.failures[failure] > 0
    example = next(f for f in report.tally.examples if f.kind == failure)
    assert example.payload
    assert "payload:" in example.reproducer()
    if kind == "raise":
        assert "KeyError: 'boom from a broken stage'" in example.detail


@pytest.mark.slow
def test_the_memory_check_catches_a_leak() -> None:
    kept: list[bytes] = []
    real = PipelineTarget(load_fleet())

    def leaking(message: Message) -> object:
        kept.append(bytes(40_000) + message.payload)
        return real(message)

    report = run_campaign(payloads=3_000, engine="mutate", seed=1, target=leaking, echo=False)
    assert report.memory.growth > 64 * MIB
    assert report.memory_failures(64)


@pytest.mark.slow
def test_the_command_exits_1_and_prints_the_reproducer(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = _broken("raise")
    monkeypatch.setattr(fuzz_cli, "PipelineTarget", lambda fleet: broken)
    result = CliRunner().invoke(
        fuzz_cli.fuzz, ["--payloads", "200", "--engine", "mutate", "--seed", "5", "--show", "1"]
    )
    assert result.exit_code == 1
    assert "failures:" in result.output
    assert "[exception]" in result.output
    assert "KeyError" in result.output


@pytest.mark.slow
def test_the_command_passes_on_the_real_path(tmp_path) -> None:
    out = tmp_path / "reports" / "report.json"  # a folder not there yet
    result = CliRunner().invoke(
        fuzz_cli.fuzz, ["--payloads", "1000", "--engine", "mutate", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert '"inputs": 1048' in out.read_text()


@pytest.mark.slow
def test_an_unknown_key_with_nul_is_storable() -> None:
    fleet = load_fleet()
    topic, valid, _ = fleet.vector_cases[0]
    payload = valid[:-1] + b',"\\u0000":1}'
    outcome = PipelineTarget(fleet)(Message(topic, payload, fleet.now_ms))
    assert isinstance(outcome, Rejection)
    assert outcome.reason is RejectReason.MALFORMED
    assert unstorable(outcome) is None


def test_a_topic_with_nul_names_no_meter_and_is_storable() -> None:
    """The broker and the wire module refuse such a topic; the worker must not depend on it:
    a NUL segment names no meter (nothing is quarantined or queried) and the stored topic is
    escaped, so the rejection commits instead of poisoning its batch."""
    fleet = load_fleet()
    _, valid, _ = fleet.vector_cases[0]
    outcome = PipelineTarget(fleet)(Message("meters/a\x00b/readings", valid, fleet.now_ms))
    assert isinstance(outcome, Rejection)
    assert outcome.reason is RejectReason.TOPIC_MISMATCH
    assert outcome.meter_id is None
    assert unstorable(outcome) is None


@pytest.mark.slow
def test_a_ci_sized_wire_campaign_keeps_every_invariant() -> None:
    report = run_wire_campaign(inputs=3_000, engine="all", seed=7, echo=False)
    tally = report.tally
    assert tally.inputs >= 3_000
    atheris = {"atheris"} if atheris_available() else set()
    assert set(tally.engines) == {"seeds", "hypothesis", "mutate", *atheris}
    assert not tally.failures, "\n".join(f.reproducer() for f in tally.examples)
    assert set(tally.drops) == {d.value for d in Drop}, "every drop reason is reached"
    assert tally.packets["publish"] > 0
    assert tally.packets["puback"] > 0
    assert not report.memory_failures(64)


def _split_losing_a_byte(data: bytes) -> _wire.Frames:
    frames = _real_split(data)
    if frames.packets and len(frames.packets[0][1]) > 3:
        first, body = frames.packets[0]
        frames.packets[0] = (first, body[1:])
    return frames


def _parse_raising(first: int, body: bytes) -> Publish | Drop:
    if b"meters" in body:
        raise IndexError("boom from a broken parser")
    return _real_parse(first, body)


def _parse_letting_wildcards_in(first: int, body: bytes) -> Publish | Drop:
    parsed = _real_parse(first, body)
    if parsed is Drop.TOPIC:
        return Publish("meters/+/readings", 1, b"")
    return parsed


_real_split = _wire.split
_real_parse = _wire.parse_publish


@pytest.mark.parametrize(
    ("name", "broken", "failure"),
    [
        ("split", _split_losing_a_byte, "split"),
        ("parse_publish", _parse_raising, "exception"),
        ("parse_publish", _parse_letting_wildcards_in, "publish"),
    ],
)
def test_the_wire_checker_catches_broken_framing(
    monkeypatch: pytest.MonkeyPatch, name: str, broken: object, failure: str
) -> None:
    monkeypatch.setattr(_wire, name, broken)
    report = run_wire_campaign(inputs=1_000, engine="mutate", seed=3, echo=False)
    assert report.tally.failures[failure] > 0
    example = next(f for f in report.tally.examples if f.kind == failure)
    assert "base64:" in example.reproducer()


def test_the_wire_command_passes_on_the_real_framing(tmp_path) -> None:
    out = tmp_path / "wire.json"
    result = CliRunner().invoke(
        fuzz_cli.fuzz,
        ["--target", "wire", "--payloads", "1000", "--engine", "mutate", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "dropped, by reason:" in result.output
    assert '"target": "wire"' in out.read_text()
