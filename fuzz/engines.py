"""The input sources, all feeding one `Checker`: the spec's vectors as they are, hypothesis
(structured corruptions of signed readings), seeded byte-level mutation, and atheris
(libFuzzer's coverage-guided mutator, in a subprocess because libFuzzer owns the process)."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.strategies import SearchStrategy

from meterproof.fuzz.checker import Case, Checker
from meterproof.fuzz.target import Fleet

Progress = Callable[[], None]
T = TypeVar("T")
CHUNK: Final = 500

#: Bytes and tokens that change how a JSON parser or validator reads what follows.
_TOKENS: Final = (
    b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b"\\u0000", b"\\ud800", b"\\\"", b"null",
    b"true", b"1e400", b"-0", b"0.5", b"18446744073709551616", b"-9223372036854775809",
    b"\xef\xbb\xbf", b"\xff", b"\xc0\x80", b"\x00", b"\n", b"=", b'"v":1', b'"kid":"x"',
)  # fmt: skip
_NUMBERS: Final = (
    b"0", b"1", b"-1", b"18446744073709551615", b"18446744073709551616", b"9223372036854775807",
    b"-9223372036854775808", b"-9223372036854775809", b"1.0", b"1e3", b"00",
    b"99999999999999999999999",
)  # fmt: skip


def run_vectors(checker: Checker, fleet: Fleet) -> None:
    """Every spec vector once, expecting exactly the outcome the vector names."""
    for topic, payload, expect in fleet.vector_cases:
        checker.check(Case(topic, payload, "vectors:spec", expect))


def run_hypothesis_chunks(
    strategy: SearchStrategy[T],
    check: Callable[[T], object],
    inputs: Callable[[], int],
    *,
    count: int,
    seed: int,
    progress: Progress,
) -> None:
    """`count` more inputs (as `inputs()` counts them) from `strategy` through `check`, in
    chunks of fresh `given` runs of at most CHUNK examples: hypothesis remembers every
    example of a run, so one run of 100,000 would grow memory that is hypothesis's, not the
    code under test's. Chunk `n` is seeded `seed * 1_000_003 + n`; `progress` after each."""
    target = inputs() + count
    chunk = 0
    while inputs() < target:
        n = min(CHUNK, target - inputs())

        @hypothesis_seed(seed * 1_000_003 + chunk)
        @settings(
            max_examples=n,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            verbosity=Verbosity.quiet,
        )
        @given(strategy)
        def run(example: T) -> None:
            check(example)

        before = inputs()
        run()
        chunk += 1
        progress()
        if inputs() == before:
            break  # hypothesis found nothing more to generate; never spin


def mutate(rng: random.Random, data: bytearray, seeds: list[tuple[str, bytes]]) -> str:
    """One byte-level mutation in place; returns its name."""
    name = rng.choice(
        (
            "bitflip",
            "byte",
            "insert",
            "delete",
            "duplicate",
            "splice",
            "number",
            "token",
            "truncate",
        )
    )
    n = len(data)
    at = rng.randrange(n + 1)
    if name == "bitflip" and n:
        data[at % n] ^= 1 << rng.randrange(8)
    elif name == "byte" and n:
        data[at % n] = rng.choice(
            (0, 0x22, 0x5C, 0x7B, 0x7D, 0x20, 0x7F, 0x80, 0xFF, rng.randrange(256))
        )
    elif name == "insert":
        data[at:at] = rng.randbytes(rng.choice((1, 2, 4, 16, 300)))
    elif name == "delete":
        del data[at : at + rng.choice((1, 2, 8, 64))]
    elif name == "duplicate" and n:
        start = rng.randrange(n)
        piece = data[start : start + rng.choice((1, 8, 40, 400))]
        data[at:at] = piece * rng.choice((1, 2, 10))
    elif name == "splice":
        other = rng.choice(seeds)[1]
        cut = rng.randrange(len(other) + 1)
        data[at:] = other[cut:]
    elif name == "number":
        digits = [i for i, b in enumerate(data) if 0x30 <= b <= 0x39]
        if digits:
            start = end = rng.choice(digits)
            while end < n and 0x30 <= data[end] <= 0x39:
                end += 1
            while start > 0 and 0x30 <= data[start - 1] <= 0x39:
                start -= 1
            data[start:end] = rng.choice(_NUMBERS)
    elif name == "token":
        data[at:at] = rng.choice(_TOKENS)
    else:
        del data[at:]
        name = "truncate"
    return name


def run_mutations(
    checker: Checker,
    seeds: list[tuple[str, bytes]],
    *,
    count: int,
    seed: int,
    progress: Progress,
    max_len: int = 8_192,
) -> None:
    rng = random.Random(seed)  # noqa: S311 - reproducible inputs, not secrets
    topics = sorted({t for t, _ in seeds})
    for i in range(count):
        topic, payload = rng.choice(seeds)
        if rng.random() < 0.05:
            topic = rng.choice(topics)
        data = bytearray(payload)
        names = [mutate(rng, data, seeds) for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 5, 9)))]
        checker.check(Case(topic, bytes(data[:max_len]), f"mutate:{names[0]}"))
        if (i + 1) % 5_000 == 0:
            progress()


def atheris_available() -> bool:
    return importlib.util.find_spec("atheris") is not None


#: libFuzzer's names for the input it stopped on, as its artifact files start.
ARTIFACTS: Final = ("crash", "timeout", "oom", "leak")


@dataclass(frozen=True, slots=True)
class AtherisRun:
    """What the atheris child left. `summary` (its tally and memory) is there when it
    exited through Python, which it also does after an uncaught exception; `findings` are
    the inputs libFuzzer stopped on, read from its artifacts, as (kind, bytes);
    `returncode` is None when the child ran past its time for the whole run and was killed."""

    returncode: int | None
    summary: dict[str, Any] | None
    findings: list[tuple[str, bytes]]
    log_tail: str

    def problem(self) -> str | None:
        """Why the run failed without an input to show for it, if it did (a finding is a
        failure of its own, with its input)."""
        if self.findings:
            return None
        if self.returncode is None:
            return f"ran past its time and was killed; its log ends:\n{self.log_tail}"
        if self.returncode or self.summary is None:
            return (
                f"exited {self.returncode} without naming an input; its log ends:\n{self.log_tail}"
            )
        return None


def run_atheris(
    *,
    target: str,
    corpus: list[bytes],
    count: int,
    seed: int,
    input_timeout: float,
    timeout_s: float,
) -> AtherisRun:
    """libFuzzer exits the process when done, so it runs in a child that writes its tally
    and memory figures as JSON on the way out (`-atheris_runs` exits through Python).
    `target` is `pipeline` (first byte: the topic, rest: the payload) or `wire` (raw
    connection bytes); `corpus` are its seed inputs. libFuzzer's own `-timeout` is the
    per-input limit there (whole seconds; 0: none); its artifacts go to a temporary folder,
    not the working one, and are read back as findings."""
    with tempfile.TemporaryDirectory(prefix="meterproof-atheris-") as tmp:
        seeds, artifacts = Path(tmp) / "corpus", Path(tmp) / "artifacts"
        seeds.mkdir()
        artifacts.mkdir()
        for i, data in enumerate(corpus):
            (seeds / f"seed-{i:04d}").write_bytes(data)
        summary = Path(tmp) / "summary.json"
        log = Path(tmp) / "libfuzzer.log"
        argv = [sys.executable, "-P", "-m", "meterproof.fuzz.atheris_driver", "--target", target,
                "--summary", str(summary), "--warmup", str(min(2_000, max(count // 10, 1))),
                "--", str(seeds), f"-atheris_runs={count}", f"-seed={seed}", "-max_len=8192",
                "-rss_limit_mb=2048", f"-timeout={math.ceil(input_timeout)}",
                f"-artifact_prefix={artifacts}/", "-print_final_stats=1"]  # fmt: skip
        returncode: int | None
        with log.open("wb") as sink:
            try:
                returncode = subprocess.run(
                    argv, stdout=sink, stderr=sink, timeout=timeout_s, check=False
                ).returncode
            except subprocess.TimeoutExpired:  # run() has killed it
                returncode = None
        findings = [
            (path.name.partition("-")[0], path.read_bytes())
            for path in sorted(artifacts.iterdir())
            if path.name.partition("-")[0] in ARTIFACTS
        ]
        return AtherisRun(
            returncode,
            json.loads(summary.read_text()) if summary.exists() else None,
            findings,
            log.read_text(errors="replace")[-3000:],
        )
