"""Child process of `meterproof fuzz --engine atheris`: libFuzzer drives the same checker.

The first byte of an input picks the topic, the rest is the payload. The modules under test
are imported inside `instrument_imports`, so libFuzzer sees their branch coverage.
"""

from __future__ import annotations

import argparse
import atexit
import json
import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped, unused-ignore]

with atheris.instrument_imports(include=["meterproof.schemas", "meterproof.ingest"]):
    import meterproof.schemas.codec  # noqa: F401 - imported here to be instrumented

from meterproof.fuzz.checker import Case, Checker
from meterproof.fuzz.target import PipelineTarget, fleet_topics, load_fleet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--summary", type=Path, required=True)
    parser.add_argument("--warmup", type=int, default=2_000)
    args, libfuzzer_args = parser.parse_known_args()
    fleet = load_fleet()
    topics = fleet_topics(fleet)
    checker = Checker(PipelineTarget(fleet), received_at_ms=fleet.now_ms, warmup=args.warmup)

    def one_input(data: bytes) -> None:
        topic = topics[data[0] % len(topics)] if data else topics[0]
        checker.check(Case(topic, data[1:], "atheris:libfuzzer"))

    def write_summary() -> None:
        checker.finish()
        args.summary.write_text(
            json.dumps({"tally": checker.tally.to_json(), "memory": checker.memory.to_json()})
        )

    atexit.register(write_summary)
    argv = [sys.argv[0], *[a for a in libfuzzer_args if a != "--"]]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
