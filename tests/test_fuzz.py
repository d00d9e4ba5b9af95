"""`meterproof fuzz` at CI size, and proof that its checker can fail."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import find, settings
from hypothesis import strategies as st

from meterproof.fuzz import cli as fuzz_cli
from meterproof.fuzz import target as fuzz_target
from meterproof.fuzz.checker import MIB, Case, Checker, Failure
from meterproof.fuzz.cli import run_campaign, run_wire_campaign
from meterproof.fuzz.engines import atheris_available
from meterproof.fuzz.generate import Generators, op_sig_tamper
from meterproof.fuzz.target import (
    JUDGED,
    SPEC_REASONS,
    PipelineTarget,
    label,
    load_fleet,
    unstorable,
)
from meterproof.ingest import _wire, security
from meterproof.ingest._wire import Drop, Publish
from meterproof.ingest.judge import RateLimit, StoredContext, judge
from meterproof.ingest.records import Accepted, Candidate, Duplicate, Message, Outcome, Rejection
from meterproof.schemas.codec import encode_reading, sign_reading
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


def _judge_never_accepting(
    candidates: Sequence[Candidate], contexts: Sequence[StoredContext], *, limit: RateLimit
) -> list[Outcome]:
    return [
        Duplicate(o.candidate) if isinstance(o, Accepted) else o
        for o in judge(candidates, contexts, limit=limit)
    ]


def _judge_blind_to_registers(
    candidates: Sequence[Candidate], contexts: Sequence[StoredContext], *, limit: RateLimit
) -> list[Outcome]:
    blind = [dataclasses.replace(c, before=None, after=None) for c in contexts]
    return judge(candidates, blind, limit=limit)


def test_an_exception_in_what_the_store_would_write_is_a_failure_with_its_reproducer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refusal whose security event cannot be built (here: `bad_signature` dropped from
    the events' table, as a new reason added without one would be) is an `exception`
    failure of that input; it stopped the run with a traceback and no reproducer."""
    events = dict(security.EVENTS)
    del events[RejectReason.BAD_SIGNATURE]
    monkeypatch.setattr(security, "EVENTS", events)
    report = run_campaign(payloads=200, engine="mutate", seed=3, echo=False)
    assert report.tally.failures["exception"] > 0
    example = next(f for f in report.tally.examples if f.kind == "exception")
    assert "KeyError" in example.detail
    assert "bad_signature" in example.detail


@pytest.mark.slow
@pytest.mark.parametrize(
    "broken", [_judge_never_accepting, _judge_blind_to_registers], ids=["never", "registers"]
)
def test_the_checker_catches_a_wrong_judge(
    monkeypatch: pytest.MonkeyPatch, broken: Callable[..., list[Outcome]]
) -> None:
    """Rules 7-9 have one right answer for a valid reading, from what is stored: any
    outcome of those rules is not enough."""
    monkeypatch.setattr(fuzz_target, "judge", broken)
    # 400 cases already give the blind judge 17 unexpected outcomes and the other 91
    report = run_campaign(payloads=400, engine="hypothesis", seed=3, echo=False)
    assert report.tally.failures["unexpected"] > 0
    example = next(f for f in report.tally.examples if f.kind == "unexpected")
    assert "spec says ['accepted']" in example.detail or "register_decreased" in example.detail


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
    monkeypatch.setattr(fuzz_cli, "run_campaign", partial(run_campaign, target=_broken("raise")))
    result = CliRunner().invoke(
        fuzz_cli.fuzz, ["--payloads", "200", "--engine", "mutate", "--seed", "5", "--show", "1"]
    )
    assert result.exit_code == 1
    assert "failures:" in result.output
    assert "[exception]" in result.output
    assert "KeyError" in result.output


@pytest.mark.slow
def test_the_printed_reproducer_holds_the_whole_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    real = PipelineTarget(load_fleet())

    def target(message: Message) -> object:
        if len(message.payload) > 2_500:
            raise KeyError("boom on a big payload")
        return real(message)

    monkeypatch.setattr(fuzz_cli, "run_campaign", partial(run_campaign, target=target))
    result = CliRunner().invoke(
        fuzz_cli.fuzz, ["--payloads", "500", "--engine", "mutate", "--seed", "5", "--show", "1"]
    )
    assert result.exit_code == 1
    printed = re.search(r"base64:  (\S+)", result.output)
    assert printed is not None
    assert len(base64.b64decode(printed.group(1))) > 2_500


@pytest.mark.slow
def test_the_command_passes_on_the_real_path(tmp_path: Path) -> None:
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


def _split_losing_the_link_on_qos_3(data: bytes) -> _wire.Frames:
    """A PUBLISH with QoS 3 is a packet to drop, not a reason to lose the link."""
    frames, consumed = _real_split(data), 0
    for n, (first, body) in enumerate(frames.packets):
        if first & 0xF6 == 0x36:
            return _wire.Frames(frames.packets[:n], consumed, Drop.LENGTH)
        consumed += 1 + len(_wire.encode_varint(len(body))) + len(body)
    return frames


_real_split = _wire.split
_real_parse = _wire.parse_publish


@pytest.mark.parametrize(
    ("name", "broken", "failure"),
    [
        ("split", _split_losing_a_byte, "split"),
        ("split", _split_losing_the_link_on_qos_3, "split"),
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


def test_the_wire_command_passes_on_the_real_framing(tmp_path: Path) -> None:
    out = tmp_path / "wire.json"
    result = CliRunner().invoke(
        fuzz_cli.fuzz,
        ["--target", "wire", "--payloads", "1000", "--engine", "mutate", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "dropped, by reason:" in result.output
    assert '"target": "wire"' in out.read_text()


def test_the_generators_send_an_empty_sig() -> None:
    """docs/spec/reading-v1.md section 5: an empty `sig` encodes no bytes and fails as
    `bad_signature`; the generators must send one and expect that."""
    generators = Generators(load_fleet(), seed=1)
    tampered = st.composite(lambda draw: op_sig_tamper(draw, generators))()
    case = find(tampered, lambda c: b'"sig":""' in c.payload, settings=settings(database=None))
    assert case.expect == frozenset({"bad_signature"})
    outcome = PipelineTarget(generators.fleet)(Message(case.topic, case.payload, 0))
    assert label(outcome) == "bad_signature"


def test_the_checker_s_rules_7_to_9_agree_with_the_judge_on_a_burst() -> None:
    """Generated readings spread their ts, so rule 9 is not reached by the campaign; a
    burst of one meter reaches it, and the checker's own rules must say what the judge says."""
    fleet = load_fleet()
    signer = next(s for s in fleet.signers if not s.slow)
    pipeline = PipelineTarget(fleet)
    checker = Checker(
        pipeline, received_at_ms=fleet.now_ms, store=pipeline.store, limit=pipeline.limit
    )
    for seq in [*range(62), 3]:
        fields = {"meter_id": signer.meter_id, "seq": seq, "ts": fleet.now_ms - 100 + seq,
                  "import_wh": seq, "export_wh": 0}  # fmt: skip
        payload = encode_reading(sign_reading(fields, signer.key))
        checker.check(Case(f"meters/{signer.meter_id}/readings", payload, "test:burst", JUDGED))
    assert not checker.tally.failures, checker.tally.examples
    assert checker.tally.outcomes == {"accepted": 60, "rate_limited": 2, "duplicate": 1}


def _hanging_at(n: int, hung: list[Message]) -> Callable[[Message], object]:
    """The real pipeline, except that the `n`-th message hangs (kept in `hung`)."""
    real = PipelineTarget(load_fleet())
    calls = [0]

    def target(message: Message) -> object:
        calls[0] += 1
        if calls[0] == n:
            hung.append(message)
            time.sleep(60)  # far past the limit: the run must not wait for it
        return real(message)

    return target


@pytest.mark.slow
def test_an_input_past_the_time_limit_stops_the_run_with_its_reproducer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Through hypothesis, whose runner must let the timeout through (the wire test below
    goes through byte mutation)."""
    hung: list[Message] = []
    monkeypatch.setattr(
        fuzz_cli, "run_campaign", partial(run_campaign, target=_hanging_at(60, hung))
    )
    out = tmp_path / "report.json"
    started = time.monotonic()
    result = CliRunner().invoke(
        fuzz_cli.fuzz,
        ["--payloads", "300", "--engine", "hypothesis", "--input-timeout", "0.5", "--show", "1",
         "--json", str(out)],
    )  # fmt: skip
    assert time.monotonic() - started < 30
    assert result.exit_code == 1, result.output
    assert "[timeout] from hypothesis:" in result.output
    assert "no outcome within 0.5 s (--input-timeout)" in result.output
    assert "time.sleep(60)" in result.output  # where it hung
    report = json.loads(out.read_text())
    assert report["failures"] == {"timeout": 1}
    assert report["inputs"] == 60, "the run stops at the input that hung"
    (saved,) = [Failure.from_json(f) for f in report["examples"]]
    assert (saved.topic, saved.payload) == (hung[0].topic, hung[0].payload)


@pytest.mark.slow
def test_a_wire_input_past_the_time_limit_stops_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]

    def split_hanging_once(data: bytes) -> _wire.Frames:
        calls[0] += 1
        if calls[0] == 100:
            time.sleep(60)
        return _real_split(data)

    monkeypatch.setattr(_wire, "split", split_hanging_once)
    report = run_wire_campaign(inputs=1_000, engine="mutate", seed=3, echo=False, input_timeout=0.5)
    assert report.tally.failures == {"timeout": 1}
    assert report.tally.inputs < 100
    (example,) = report.tally.examples
    assert example.kind == "timeout"
    assert "base64:" in example.reproducer()


#: Loaded by the atheris child (PYTHONPATH): the framing under test crashes or hangs on
#: the 200th split, or the child dies before fuzzing; the test picks one by FUZZ_FAULT.
_CHILD_FAULT = """
import os, time
from meterproof.ingest import _wire

class InjectedCrash(BaseException):
    pass

_real, _calls = _wire.split, [0]

def split(data):
    _calls[0] += 1
    if _calls[0] == 200:
        if os.environ["FUZZ_FAULT"] == "crash":
            raise InjectedCrash("boom in the child")
        time.sleep(60)
    return _real(data)

if os.environ.get("FUZZ_FAULT") == "exit":
    os._exit(3)
if os.environ.get("FUZZ_FAULT"):
    _wire.split = split
"""


@pytest.mark.slow
@pytest.mark.skipif(not atheris_available(), reason="atheris is not installed")
@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("crash", ["[crash] from atheris:libfuzzer", "InjectedCrash: boom in the child"]),
        ("hang", ["[timeout] from atheris:libfuzzer", "libFuzzer: timeout"]),
        ("exit", ["atheris: exited 3 without naming an input"]),
    ],
)
def test_an_atheris_child_that_fails_fails_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fault: str, expected: list[str]
) -> None:
    """The child's exit status is read: a crash or a hang there is a failure with its
    input, reproduced from libFuzzer's artifact (left in no working folder)."""
    (tmp_path / "sitecustomize.py").write_text(_CHILD_FAULT)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("FUZZ_FAULT", fault)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        fuzz_cli.fuzz,
        ["--target", "wire", "--payloads", "2000", "--engine", "atheris", "--input-timeout", "1"],
    )
    assert result.exit_code == 1, result.output
    for text in expected:
        assert text in result.output
    if fault != "exit":
        assert re.search(r"base64:  \S+", result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sitecustomize.py"]
