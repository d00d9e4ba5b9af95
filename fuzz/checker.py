"""The invariants every input must keep, checked one case at a time.

1. Nothing escapes: the target returns an outcome the worker can acknowledge.
2. A rejection carries one of the spec's reason codes.
3. Where the generator knows what the spec requires (`Case.expect`), the outcome is one of it;
   for a reading that passes rules 1-6, exactly the outcome of rules 7-9 as `judged`
   decides them here, from what the store holds, without the code under test.
4. An accepted payload reads the same to a second parser (the standard library's `json`,
   strictly): two parsers must never disagree about what was signed.
5. What the store would write for the outcome, PostgreSQL can hold (else: a poison message).
Memory is sampled as it goes; growth after the warm-up beyond a bound is a failure too.
An input that runs past the per-input time limit (`InputClock`) is a failure that stops
the run, as a timeout stops libFuzzer.
"""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from types import FrameType
from typing import Any, Final, Generic, Protocol, TypeVar

import psutil  # type: ignore[import-untyped, unused-ignore]

from meterproof.fuzz.target import (
    JUDGED,
    SPEC_REASONS,
    MemoryStore,
    Target,
    label,
    signed_values,
    unstorable,
)
from meterproof.ingest.judge import RateLimit
from meterproof.ingest.records import Accepted, Message

MIB: Final = 1024 * 1024
KINDS: Final = (
    "exception", "unknown_reason", "unexpected", "disagreement", "unstorable", "timeout",
    "crash", "oom", "leak",  # the last three: libFuzzer's, from the atheris child
)  # fmt: skip
R = TypeVar("R")


class InputTimeout(BaseException):
    """One input ran past the per-input limit. Raised by SIGALRM wherever the main thread
    is, so a BaseException: no `except Exception` on the way (the code under test's, the
    checker's, hypothesis's) may take it for an ordinary outcome."""


class InputClock:
    """The per-input time limit (`--input-timeout`): SIGALRM `seconds` after an input
    starts; 0 is no limit.

    A timer in this process, not a process per input: one `setitimer` call to arm and one
    to disarm, nothing a 100,000-input run can measure. It interrupts a hang in Python code
    (or in a call that returns to the interpreter on a signal, like `sleep`); a hang inside
    one C call is interrupted only when that call returns. Signals reach the main thread
    only, so the clock is entered there. On exit the previous handler, and a timer that
    was running before (pytest-timeout's), are put back.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._armed = False
        self._outer: tuple[Any, float, float, float] | None = None

    def __enter__(self) -> InputClock:
        if self.seconds:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("a per-input time limit needs the main thread (0: no limit)")
            handler = signal.signal(signal.SIGALRM, self._expire)
            delay, interval = signal.setitimer(signal.ITIMER_REAL, 0)
            self._outer = (handler, delay, interval, time.monotonic())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._outer is None:
            return
        handler, delay, interval, since = self._outer
        self._outer = None
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if handler is None else handler)
        if delay:
            left = max(delay - (time.monotonic() - since), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, interval)

    def start(self) -> None:
        if self._outer is not None:
            self._armed = True
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def stop(self) -> None:
        if self._outer is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._armed = False  # after: a signal already on its way finds it disarmed

    def _expire(self, signum: int, frame: FrameType | None) -> None:
        if self._armed:
            self._armed = False
            raise InputTimeout(f"no outcome within {self.seconds:g} s")


@dataclass(frozen=True, slots=True)
class Case:
    topic: str
    payload: bytes
    origin: str  # engine:generator, e.g. "hypothesis:extra_key"
    expect: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    kind: str
    origin: str
    topic: str
    payload: bytes
    detail: str

    def reproducer(self) -> str:
        return (
            f"[{self.kind}] from {self.origin}\n  topic:   {self.topic!r}\n"
            f"  payload: {self.payload[:600]!r}{' ...' if len(self.payload) > 600 else ''}\n"
            f"  base64:  {base64.b64encode(self.payload).decode()}\n"  # whole: it reproduces
            f"  {self.detail.strip()[-1500:]}"
        )

    def to_json(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "origin": self.origin,
            "topic": self.topic,
            "payload_b64": base64.b64encode(self.payload).decode(),
            "detail": self.detail[-4000:],
        }

    @classmethod
    def from_json(cls, data: dict[str, str]) -> Failure:
        return cls(
            data["kind"],
            data["origin"],
            data["topic"],
            base64.b64decode(data["payload_b64"]),
            data["detail"],
        )


@dataclass(slots=True)
class Memory:
    """RSS in bytes: at start, after the warm-up (caches, imports, the judge's bounded
    store have filled), the peak, and at the end."""

    warmup: int
    start: int = 0
    warm: int | None = None
    peak: int = 0
    end: int = 0

    def sample(self, inputs: int) -> None:
        rss = int(psutil.Process().memory_info().rss)
        if not self.start:
            self.start = rss
        if self.warm is None and inputs >= self.warmup:
            self.warm = rss
        self.peak = max(self.peak, rss)
        self.end = rss

    @property
    def growth(self) -> int:
        return self.end - (self.warm if self.warm is not None else self.start)

    def to_json(self) -> dict[str, int | None]:
        return {
            "start": self.start,
            "warm": self.warm,
            "peak": self.peak,
            "end": self.end,
            "growth": self.growth,
        }


@dataclass(slots=True)
class Tally:
    inputs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    engines: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[Failure] = field(default_factory=list)

    def merge(self, other: dict[str, Any]) -> None:
        """Add a tally reported as JSON (by the atheris subprocess)."""
        self.inputs += int(other["inputs"])
        self.outcomes.update(other["outcomes"])
        self.engines.update(other["engines"])
        self.failures.update(other["failures"])
        self.examples += [Failure.from_json(f) for f in other["examples"]]

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "outcomes": dict(sorted(self.outcomes.items())),
            "engines": dict(self.engines),
            "failures": dict(self.failures),
            "examples": [f.to_json() for f in self.examples],
        }


class _Counts(Protocol):
    inputs: int
    engines: Counter[str]


TallyT = TypeVar("TallyT", bound=_Counts)


class Counting(Generic[TallyT]):
    """What a checker does around its invariants: counts each input by engine (its
    origin's prefix), samples RSS every `sample_every` inputs, and keeps `keep` reproducers
    per failure kind and origin (the failures themselves are all counted by the checker).
    With a `clock`, each input runs within its limit (`_timed`)."""

    def __init__(
        self,
        tally: TallyT,
        *,
        keep: int,
        sample_every: int,
        warmup: int,
        clock: InputClock | None = None,
    ) -> None:
        self.tally = tally
        self.memory = Memory(warmup=warmup)
        self._clock = clock
        self._keep = keep
        self._kept: Counter[tuple[str, str]] = Counter()
        self._sample_every = sample_every
        self.memory.sample(0)

    def finish(self) -> None:
        self.memory.sample(self.tally.inputs)

    def _count(self, origin: str) -> None:
        tally = self.tally
        tally.inputs += 1
        tally.engines[origin.split(":", 1)[0]] += 1
        if tally.inputs % self._sample_every == 0:
            self.memory.sample(tally.inputs)

    def _timed(self, work: Callable[[], R], timed_out: Callable[[str], object]) -> R:
        """`work()` within the clock's limit. Past it, `timed_out(detail)` records the input
        as a failure (the traceback shows where it was) and `InputTimeout` goes on up: the
        run stops there. The outer `try` also holds `stop()`, so a signal that lands while
        disarming is still this input's."""
        clock = self._clock
        if clock is None:
            return work()
        try:
            clock.start()
            try:
                return work()
            finally:
                clock.stop()
        except InputTimeout:
            timed_out(
                f"no outcome within {clock.seconds:g} s (--input-timeout): the run stopped "
                f"at this input\n{traceback.format_exc()}"
            )
            raise

    def _keeps(self, kind: str, origin: str) -> bool:
        """Whether this failure's reproducer is kept (the first `keep` of its kind and origin)."""
        key = (kind, origin)
        if self._kept[key] >= self._keep:
            return False
        self._kept[key] += 1
        return True


def _broken_invariant(case: Case, outcome: object, name: str) -> tuple[str, Case, str] | None:
    """The first invariant `outcome` breaks, in the module's order, as `fail`'s arguments.
    What the store would write is worked out last, by the store's own code (the refusal's
    security event): an exception there is a finding of this input too."""
    if name not in SPEC_REASONS and name not in ("accepted", "duplicate"):
        return "unknown_reason", case, f"outcome {name!r} is not a spec reason"
    if case.expect is not None and name not in case.expect:
        return "unexpected", case, f"got {name}, spec says {sorted(case.expect)}"
    if isinstance(outcome, Accepted):
        disagreement = _second_parser_disagrees(case.payload, outcome)
        if disagreement is not None:
            return "disagreement", case, disagreement
    try:
        refused = unstorable(outcome)
    except Exception:  # noqa: BLE001 - an escaped exception is the finding itself
        return "exception", case, traceback.format_exc()
    return None if refused is None else ("unstorable", case, f"{name}: {refused}")


class Checker(Counting[Tally]):
    """Runs cases through `target` and keeps the tally; `keep` reproducers per failure
    kind and origin are kept, every failure is counted. `store` is what the target judges
    against (and `limit` its rate limit): given it, a case that passes rules 1-6 expects
    exactly the outcome `judged` derives, not just any outcome of rules 7-9."""

    def __init__(
        self,
        target: Target,
        *,
        received_at_ms: int,
        store: MemoryStore | None = None,
        limit: RateLimit | None = None,
        keep: int = 3,
        sample_every: int = 1_000,
        warmup: int = 2_000,
        clock: InputClock | None = None,
    ) -> None:
        super().__init__(Tally(), keep=keep, sample_every=sample_every, warmup=warmup, clock=clock)
        self.target = target
        self._received_at_ms = received_at_ms
        self._store = store
        self._limit = limit or RateLimit()

    def check(self, case: Case) -> str | None:
        """The outcome's label, or None when the case failed (and is counted); raises
        `InputTimeout` (counted too) when it ran past the clock's limit."""
        self._count(case.origin)
        return self._timed(partial(self._check, case), partial(self.fail, "timeout", case))

    def _check(self, case: Case) -> str | None:
        if case.expect == JUDGED and self._store is not None:  # before the target stores it
            wire = json.loads(case.payload)
            case = replace(case, expect=frozenset({judged(self._store, wire, self._limit)}))
        message = Message(case.topic, case.payload, self._received_at_ms)
        try:
            outcome = self.target(message)
            name = label(outcome)
        except Exception:  # noqa: BLE001 - an escaped exception is the finding itself
            return self.fail("exception", case, traceback.format_exc())
        failure = _broken_invariant(case, outcome, name)
        if failure is not None:
            return self.fail(*failure)
        self.tally.outcomes[name] += 1
        return name

    def fail(self, kind: str, case: Case, detail: str) -> str | None:
        """Count `case` as a `kind` failure (and keep it): the checker's own findings, and
        the input libFuzzer stopped on in the atheris child."""
        self.tally.failures[kind] += 1
        self.tally.outcomes[f"FAILED:{kind}"] += 1
        if self._keeps(kind, case.origin):
            self.tally.examples.append(Failure(kind, case.origin, case.topic, case.payload, detail))
        return None  # the checker's answer for "this case failed"


def judged(store: MemoryStore, wire: Mapping[str, Any], limit: RateLimit) -> str:
    """Rules 7-9 of docs/spec/reading-v1.md section 9 for a reading (`wire`, as the
    standard library parses it) that passes rules 1-6, from what `store` holds: written
    out plainly here, not by `ingest.judge`, so that a wrong judge is caught."""
    meter_id, seq, ts = wire["meter_id"], wire["seq"], wire["ts"]
    stored = store.values.get((meter_id, seq))
    if stored is not None:
        return "duplicate" if stored == signed_values(wire) else "seq_reused"
    points = sorted(store.history.get(meter_id, ()), key=lambda p: (p.ts_ms, p.seq))
    before = [p for p in points if (p.ts_ms, p.seq) < (ts, seq)]
    after = [p for p in points if (p.ts_ms, p.seq) > (ts, seq)]
    imp, exp = wire["import_wh"], wire["export_wh"]
    if before and (imp < before[-1].import_wh or exp < before[-1].export_wh):
        return "register_decreased"
    if after and (imp > after[0].import_wh or exp > after[0].export_wh):
        return "register_decreased"
    # The windows holding ts end in [ts, ts + window); the fullest ends at ts or at a
    # stored ts in that range (between those the count only falls).
    times = [p.ts_ms for p in points]
    ends = {ts, *(t for t in times if ts <= t < ts + limit.window_ms)}
    for end in ends:
        if 1 + sum(end - limit.window_ms < t <= end for t in times) > limit.max_readings:
            return "rate_limited"
    return "accepted"


def _second_parser_disagrees(payload: bytes, outcome: Accepted) -> str | None:
    pairs: list[tuple[str, object]] = []

    def hook(items: list[tuple[str, object]]) -> dict[str, object]:
        pairs.extend(items)
        return dict(items)

    try:
        text = payload.decode("utf-8", errors="strict")
        parsed = json.loads(
            text, object_pairs_hook=hook, parse_float=_refuse, parse_constant=_refuse
        )
    except (ValueError, RecursionError) as exc:
        return f"accepted, but the standard library refuses it: {exc}"
    if text.startswith("\ufeff"):
        return "accepted with a byte-order mark"
    if len(pairs) != len({k for k, _ in pairs}):
        return "accepted with a key given twice"
    wire = outcome.candidate.reading.wire_dict()
    if parsed != wire or any(type(parsed[k]) is not type(v) for k, v in wire.items()):
        return f"second parser reads {parsed!r}, the model {wire!r}"
    return None


def _refuse(token: str) -> object:
    raise ValueError(f"non-integer number {token}")
