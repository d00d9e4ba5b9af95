"""`meterproof fuzz`: generated and mutated payloads through decode -> verify -> judge, or
(`--target wire`) raw connection bytes through the MQTT framing."""

from __future__ import annotations

import json
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import click

from meterproof.fuzz.checker import (
    MIB,
    Case,
    Checker,
    Failure,
    InputClock,
    InputTimeout,
    Memory,
    Tally,
)
from meterproof.fuzz.engines import (
    ARTIFACTS,
    atheris_available,
    run_atheris,
    run_hypothesis_chunks,
    run_mutations,
    run_vectors,
)
from meterproof.fuzz.generate import Generators
from meterproof.fuzz.target import (
    PipelineTarget,
    Target,
    atheris_input,
    fleet_topics,
    load_fleet,
)
from meterproof.fuzz.wire import (
    WireChecker,
    WireFailure,
    WireTally,
    run_wire_mutations,
    seed_streams,
    wire_streams,
)

ENGINES = ("all", "hypothesis", "mutate", "atheris")
TARGETS = ("pipeline", "wire")
INPUT_TIMEOUT_S = 5.0


TallyT = TypeVar("TallyT", Tally, WireTally)


@dataclass(slots=True)
class CampaignReport(ABC, Generic[TallyT]):
    """What a campaign reports, whichever its target; `Report` and `WireReport` add what
    leads their JSON."""

    tally: TallyT
    memory: Memory
    seconds: float
    atheris: str  # "yes", "no (not installed)", "no (the run stopped at a timeout)", "not asked"
    atheris_memory: dict[str, Any] | None = None
    atheris_problem: str | None = None  # the child failed with no input to show for it

    def memory_failures(self, bound_mib: float) -> list[str]:
        out = []
        if self.memory.growth > bound_mib * MIB:
            out.append(f"in-process RSS grew {self.memory.growth / MIB:.1f} MiB after warm-up")
        if self.atheris_memory and self.atheris_memory["growth"] > bound_mib * MIB:
            out.append(f"atheris RSS grew {self.atheris_memory['growth'] / MIB:.1f} MiB")
        return out

    def problems(self, bound_mib: float) -> list[str]:
        """What fails the run besides the tally's failures (each with its input)."""
        memory = [f"memory: {problem}" for problem in self.memory_failures(bound_mib)]
        return memory + ([f"atheris: {self.atheris_problem}"] if self.atheris_problem else [])

    def to_json(self, bound_mib: float) -> dict[str, Any]:
        return {
            **self._lead_json(),
            "atheris": self.atheris,
            "atheris_problem": self.atheris_problem,
            "memory_bound_mib": bound_mib,
            "memory": self.memory.to_json(),
            "atheris_memory": self.atheris_memory,
            **self.tally.to_json(),
        }

    @abstractmethod
    def _lead_json(self) -> dict[str, Any]:
        """The keys that open the JSON, before the shared ones."""


@dataclass(slots=True)
class Report(CampaignReport[Tally]):
    shares: dict[str, int] = field(default_factory=dict)

    def _lead_json(self) -> dict[str, Any]:
        return {
            "inputs": self.tally.inputs,
            "seconds": round(self.seconds, 2),
            "rate_per_s": round(self.tally.inputs / self.seconds) if self.seconds else None,
            "shares": self.shares,
        }


def split(payloads: int, engine: str, *, with_atheris: bool) -> dict[str, int]:
    """all: 40% hypothesis, 40% byte mutation, 20% atheris (its share goes to mutation when
    atheris is missing)."""
    if engine != "all":
        return {engine: payloads}
    hyp = payloads * 2 // 5
    ath = payloads // 5 if with_atheris else 0
    return {"hypothesis": hyp, "mutate": payloads - hyp - ath, "atheris": ath}


def _atheris_state(
    engine: str, shares: dict[str, int], *, have_atheris: bool, stopped: bool
) -> str:
    """What the report says of atheris: whether its share ran and, if not, why."""
    if shares.get("atheris"):
        return "no (the run stopped at a timeout)" if stopped else "yes"
    return "no (not installed)" if engine == "all" and not have_atheris else "not asked"


def _run_atheris(
    tally: Tally | WireTally,
    found: Callable[[str, bytes, str], object],
    *,
    target: str,
    corpus: list[bytes],
    count: int,
    seed: int,
    input_timeout: float,
) -> tuple[dict[str, Any] | None, str | None]:
    """atheris's share, in its subprocess: its tally is added to `tally`, and each input
    libFuzzer stopped on (a crash, a timeout) to the failures by `found(kind, input,
    detail)`. Returns its memory figures and why it failed with no input, if it did."""
    run = run_atheris(
        target=target,
        corpus=corpus,
        count=count,
        seed=seed,
        input_timeout=input_timeout,
        timeout_s=120 + count / 100,
    )
    if run.summary is not None:
        tally.merge(run.summary["tally"])
    for kind, data in run.findings:
        found(kind, data, f"libFuzzer stopped on it (exit {run.returncode}):\n{run.log_tail}")
    return (run.summary["memory"] if run.summary else None), run.problem()


def _stopped_by_timeout(clock: InputClock, engines: Callable[[], None]) -> bool:
    """The in-process engines under the per-input clock; True when an input ran past it
    (that input is a failure already, and nothing after it runs)."""
    with clock:
        try:
            engines()
        except InputTimeout:
            return True
    return False


def run_campaign(
    *,
    payloads: int,
    engine: str,
    seed: int,
    target: Target | None = None,
    echo: bool = True,
    input_timeout: float = INPUT_TIMEOUT_S,
) -> Report:
    """The whole run, in-process except atheris; `target` replaces the pipeline (tests
    feed a broken one to prove the checker catches it). An input past `input_timeout`
    seconds is a failure that stops the run there."""
    started = time.perf_counter()
    fleet = load_fleet()
    pipeline = PipelineTarget(fleet)
    clock = InputClock(input_timeout)
    checker = Checker(
        target or pipeline,
        received_at_ms=fleet.now_ms,
        store=pipeline.store if target is None else None,
        limit=pipeline.limit,
        warmup=min(2_000, max(payloads // 10, 1)),
        clock=clock,
    )
    have_atheris = atheris_available()
    shares = split(payloads, engine, with_atheris=have_atheris)
    if shares.get("atheris") and not have_atheris:
        raise click.UsageError("atheris is not installed (pip install atheris)")

    def progress() -> None:
        if echo:
            t = checker.tally
            rate = t.inputs / max(time.perf_counter() - started, 1e-9)
            click.echo(
                f"  {t.inputs:>9,} inputs  {rate:>7,.0f}/s  rss {checker.memory.end / MIB:6.1f} MiB"
                f"  failures {sum(t.failures.values())}",
                err=True,
            )

    generators = Generators(fleet, seed=seed)
    seeds = [(t, p) for t, p, _ in fleet.vector_cases]
    seeds += generators.seed_payloads(random.Random(seed), per_signer=4)  # noqa: S311 - reproducible inputs

    def in_process() -> None:
        run_vectors(checker, fleet)
        if shares.get("hypothesis"):
            if echo:
                click.echo(f"hypothesis: {shares['hypothesis']:,} structured cases", err=True)
            run_hypothesis_chunks(
                generators.cases(),
                checker.check,
                lambda: checker.tally.inputs,
                count=shares["hypothesis"],
                seed=seed,
                progress=_every(progress, 20),
            )
        if shares.get("mutate"):
            if echo:
                click.echo(f"mutate: {shares['mutate']:,} byte-level mutations", err=True)
            run_mutations(checker, seeds, count=shares["mutate"], seed=seed, progress=progress)

    stopped = _stopped_by_timeout(clock, in_process)
    checker.finish()
    atheris_memory, atheris_problem = None, None
    if shares.get("atheris") and not stopped:
        if echo:
            click.echo(f"atheris: {shares['atheris']:,} libFuzzer inputs (subprocess)", err=True)
        topics = fleet_topics(fleet)

        def found(kind: str, data: bytes, detail: str) -> None:
            checker.fail(kind, Case(*atheris_input(topics, data), "atheris:libfuzzer"), detail)

        atheris_memory, atheris_problem = _run_atheris(
            checker.tally,
            found,
            target="pipeline",
            corpus=[bytes([topics.index(topic)]) + payload for topic, payload in seeds],
            count=shares["atheris"],
            seed=seed,
            input_timeout=input_timeout,
        )
    return Report(
        checker.tally,
        checker.memory,
        time.perf_counter() - started,
        _atheris_state(engine, shares, have_atheris=have_atheris, stopped=stopped),
        atheris_memory,
        atheris_problem,
        shares=shares,
    )


@dataclass(slots=True)
class WireReport(CampaignReport[WireTally]):
    def _lead_json(self) -> dict[str, Any]:
        return {"target": "wire", "seconds": round(self.seconds, 2)}


def run_wire_campaign(
    *,
    inputs: int,
    engine: str,
    seed: int,
    echo: bool = True,
    input_timeout: float = INPUT_TIMEOUT_S,
) -> WireReport:
    """Raw connection bytes through the framing: the same engines, split and per-input
    time limit as payloads."""
    started = time.perf_counter()
    clock = InputClock(input_timeout)
    checker = WireChecker(warmup=min(2_000, max(inputs // 10, 1)), clock=clock)
    have_atheris = atheris_available()
    shares = split(inputs, engine, with_atheris=have_atheris)
    if shares.get("atheris") and not have_atheris:
        raise click.UsageError("atheris is not installed (pip install atheris)")

    def progress() -> None:
        if echo:
            t = checker.tally
            click.echo(
                f"  {t.inputs:>9,} inputs  rss {checker.memory.end / MIB:6.1f} MiB"
                f"  failures {sum(t.failures.values())}",
                err=True,
            )

    seeds = seed_streams()

    def in_process() -> None:
        for stream in seeds:
            checker.check(stream, "seeds:wire")
        if shares.get("hypothesis"):
            run_hypothesis_chunks(
                wire_streams(),
                lambda data: checker.check(data, "hypothesis:stream"),
                lambda: checker.tally.inputs,
                count=shares["hypothesis"],
                seed=seed,
                progress=_every(progress, 20),
            )
        if shares.get("mutate"):
            run_wire_mutations(checker, seeds, count=shares["mutate"], seed=seed, progress=progress)

    stopped = _stopped_by_timeout(clock, in_process)
    checker.finish()
    atheris_memory, atheris_problem = None, None
    if shares.get("atheris") and not stopped:
        atheris_memory, atheris_problem = _run_atheris(
            checker.tally,
            lambda kind, data, detail: checker.fail(kind, "atheris:libfuzzer", data, detail),
            target="wire",
            corpus=seeds,
            count=shares["atheris"],
            seed=seed,
            input_timeout=input_timeout,
        )
    return WireReport(
        checker.tally,
        checker.memory,
        time.perf_counter() - started,
        _atheris_state(engine, shares, have_atheris=have_atheris, stopped=stopped),
        atheris_memory,
        atheris_problem,
    )


def wire_summary(report: WireReport, bound_mib: float) -> str:
    t = report.tally
    lines = [
        f"inputs: {t.inputs:,} raw streams in {report.seconds:.1f} s; engines: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(t.engines.items())),
        f"atheris: {report.atheris}",
        "packets parsed:",
        *(f"  {name:<22} {n:>9,}" for name, n in sorted(t.packets.items())),
        "dropped, by reason:",
        *(f"  {name:<22} {n:>9,}" for name, n in sorted(t.drops.items())),
        *_memory_and_failures(report, bound_mib),
    ]
    return "\n".join(lines)


def _every(progress: Callable[[], None], n: int) -> Callable[[], None]:
    calls = [0]

    def maybe() -> None:
        calls[0] += 1
        if calls[0] % n == 0:
            progress()

    return maybe


def summary(report: Report, bound_mib: float) -> str:
    t = report.tally
    lines = [
        f"inputs: {t.inputs:,} in {report.seconds:.1f} s "
        f"({t.inputs / max(report.seconds, 1e-9):,.0f}/s); engines: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(t.engines.items())),
        f"atheris: {report.atheris}",
        "outcomes:",
        *(f"  {name:<22} {n:>9,}" for name, n in sorted(t.outcomes.items())),
        *_memory_and_failures(report, bound_mib),
    ]
    return "\n".join(lines)


def _memory_and_failures(report: CampaignReport[Any], bound_mib: float) -> list[str]:
    """The last lines of either summary: RSS in-process and under atheris, then failures."""
    m, failures = report.memory, report.tally.failures
    lines = [
        f"rss (in-process): start {m.start / MIB:.1f} MiB, after warm-up "
        f"{(m.warm or m.start) / MIB:.1f}, peak {m.peak / MIB:.1f}, end {m.end / MIB:.1f}; "
        f"growth {m.growth / MIB:+.1f} MiB (bound {bound_mib:g})",
    ]
    if report.atheris_memory:
        a = report.atheris_memory
        lines.append(
            f"rss (atheris): start {a['start'] / MIB:.1f} MiB, peak {a['peak'] / MIB:.1f}, "
            f"end {a['end'] / MIB:.1f}; growth {a['growth'] / MIB:+.1f} MiB"
        )
    total = sum(failures.values())
    lines.append(
        f"failures: {total}"
        + (" (" + ", ".join(f"{k} {v}" for k, v in failures.items()) + ")" if total else "")
    )
    return lines


@click.command()
@click.option("--target", type=click.Choice(TARGETS), default="pipeline", show_default=True,
              help="pipeline: payloads through decode -> verify -> judge; wire: raw "
              "connection bytes through the MQTT framing.")  # fmt: skip
@click.option("--payloads", type=click.IntRange(1, 10_000_000), default=100_000, show_default=True,
              help="Inputs in all (the spec vectors or seed streams come on top).")  # fmt: skip
@click.option("--engine", type=click.Choice(ENGINES), default="all", show_default=True,
              help="all: 40% hypothesis, 40% byte mutation, 20% atheris if installed.")  # fmt: skip
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=1, show_default=True,
              help="Same seed, same corruptions and mutations (atheris: same libFuzzer "
              "seed); PS256 signatures are randomised (its salt), so their bytes differ "
              "between runs: a failure's reproducer holds its exact bytes.")  # fmt: skip
@click.option("--max-rss-growth-mb", type=click.FloatRange(min=1), default=64.0, show_default=True,
              help="Fail if RSS grows more than this after the warm-up.")  # fmt: skip
@click.option("--input-timeout", type=click.FloatRange(min=0), default=INPUT_TIMEOUT_S,
              show_default=True, help="Seconds one input may take: past it the run stops "
              "with a `timeout` failure and that input's reproducer (atheris: libFuzzer's "
              "-timeout, in whole seconds rounded up). 0: no limit.")  # fmt: skip
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the report as JSON here.")  # fmt: skip
@click.option("--show", type=click.IntRange(0, 1000), default=10, show_default=True,
              help="Reproducers to print on failure.")  # fmt: skip
def fuzz(
    *,
    target: str,
    payloads: int,
    engine: str,
    seed: int,
    max_rss_growth_mb: float,
    input_timeout: float,
    json_out: Path | None,
    show: int,
) -> None:
    """Hostile payloads through the worker's decode -> verify -> judge path, in-process.

    Fails (exit 1) on an escaped exception, a rejection whose reason is not the spec's, an
    outcome other than the one the spec requires for a generated case, an accepted payload a
    second JSON parser reads differently, an outcome PostgreSQL could not store, an input
    that runs past --input-timeout (the run stops there), an input the atheris child
    crashed or timed out on, an atheris child that exits non-zero without naming one, or
    RSS growth beyond --max-rss-growth-mb; each failure is printed as a reproducer. With
    --target wire: on an escaped exception or a framing invariant broken (see fuzz/wire.py).
    """
    if json_out is not None:  # now, not after minutes of fuzzing that would be lost
        json_out.parent.mkdir(parents=True, exist_ok=True)
    report: Report | WireReport
    if target == "wire":
        report = run_wire_campaign(
            inputs=payloads, engine=engine, seed=seed, input_timeout=input_timeout
        )
        click.echo(wire_summary(report, max_rss_growth_mb))
    else:
        report = run_campaign(
            payloads=payloads, engine=engine, seed=seed, input_timeout=input_timeout
        )
        click.echo(summary(report, max_rss_growth_mb))
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_json(max_rss_growth_mb), indent=2) + "\n")
    problems = report.problems(max_rss_growth_mb)
    examples: list[Failure | WireFailure] = [*report.tally.examples]
    # What stopped a run (a timeout, libFuzzer's crash) first: --show must not hide it.
    for failure in sorted(examples, key=lambda f: f.kind not in ARTIFACTS)[:show]:
        click.echo(failure.reproducer(), err=True)
    for problem in problems:
        click.echo(problem, err=True)
    if report.tally.failures or problems:
        raise SystemExit(1)
