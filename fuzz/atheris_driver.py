"""Child process of `meterproof fuzz --engine atheris`: libFuzzer drives the same checkers.

`--target pipeline`: the first byte of an input picks the topic, the rest is the payload.
`--target wire`: an input is the bytes of one read from a connection. The modules under
test are imported inside `instrument_imports`, so libFuzzer sees their branch coverage.
"""

from __future__ import annotations

import argparse
import atexit
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris  # type: ignore[import-untyped, unused-ignore]

with atheris.instrument_imports(include=["meterproof.schemas", "meterproof.ingest"]):
    import meterproof.ingest._wire
    import meterproof.schemas.codec  # noqa: F401 - imported here to be instrumented

from meterproof.fuzz.checker import Case, Checker
from meterproof.fuzz.target import PipelineTarget, atheris_input, fleet_topics, load_fleet
from meterproof.fuzz.wire import WireChecker


def _pipeline(warmup: int) -> tuple[Callable[[bytes], object], Callable[[], dict[str, Any]]]:
    fleet = load_fleet()
    topics = fleet_topics(fleet)
    checker = Checker(PipelineTarget(fleet), received_at_ms=fleet.now_ms, warmup=warmup)

    def one_input(data: bytes) -> object:
        return checker.check(Case(*atheris_input(topics, data), "atheris:libfuzzer"))

    def summary() -> dict[str, Any]:
        checker.finish()
        return {"tally": checker.tally.to_json(), "memory": checker.memory.to_json()}

    return one_input, summary


def _wire(warmup: int) -> tuple[Callable[[bytes], object], Callable[[], dict[str, Any]]]:
    checker = WireChecker(warmup=warmup)

    def summary() -> dict[str, Any]:
        checker.finish()
        return {"tally": checker.tally.to_json(), "memory": checker.memory.to_json()}

    return lambda data: checker.check(data, "atheris:libfuzzer"), summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", choices=("pipeline", "wire"), default="pipeline")
    parser.add_argument("--summary", type=Path, required=True)
    parser.add_argument("--warmup", type=int, default=2_000)
    args, libfuzzer_args = parser.parse_known_args()
    one_input, summary = (_wire if args.target == "wire" else _pipeline)(args.warmup)
    atexit.register(lambda: args.summary.write_text(json.dumps(summary())))
    argv = [sys.argv[0], *[a for a in libfuzzer_args if a != "--"]]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
