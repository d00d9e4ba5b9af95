"""`meterproof bench`: benchmark suites, bounded in time, with progress on stderr.

Without a subcommand every suite runs, in an order that puts the limits first (so the
pipeline's figures have their reference in the same run), each with a time budget: a suite
whose budget no longer fits in the bound is skipped and said so, and the report keeps that
suite's previous result, dated. Each suite's size is chosen so it fits its budget on the
2-core machine the figures were taken on.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import click

from meterproof.bench import report
from meterproof.bench.machine import describe
from meterproof.cli.errors import Group

if TYPE_CHECKING:
    from meterproof.bench.ingest import DrainResult

_STARTED = time.monotonic()


def _progress(line: str) -> None:
    elapsed = int(time.monotonic() - _STARTED)
    click.echo(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {line}", err=True)


@contextmanager
def _run_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="meterproof-bench-") as tmp:
        Path(tmp).chmod(0o755)  # PostgreSQL runs as its own unprivileged user
        yield Path(tmp)


def _quick(ctx: click.Context) -> bool:
    return bool(ctx.obj and ctx.obj.get("quick"))


def _saved(ctx: click.Context, suite: str, figures: dict[str, object]) -> None:
    saved = report.save(suite, describe(), figures, quick=_quick(ctx))
    _progress(f"raw results: {saved}; report: {report.render()}")


@dataclass(frozen=True, slots=True)
class Budget:
    """Seconds a suite may take: the whole run's bound is the sum of these."""

    full: int
    quick: int


BUDGETS: Final[dict[str, Budget]] = {
    "limits": Budget(60, 15),
    "registration": Budget(20, 8),
    "ingest": Budget(240, 32),
    "load": Budget(240, 28),
    "connections": Budget(260, 20),
    "bridge": Budget(80, 16),
    "api": Budget(600, 60),
}
BOUND_S: Final = {False: 25 * 60, True: 3 * 60}


@click.group(cls=Group, invoke_without_command=True)
@click.option("--quick", is_flag=True, help="Smaller runs (at most three minutes in all).")
@click.pass_context
def bench(ctx: click.Context, quick: bool) -> None:
    """Measure the pipeline against this machine's raw limits; writes docs/benchmarks.md,
    raw JSON under bench/results/ and plots under docs/img/.

    Without a subcommand every suite runs, within 25 minutes (3 with --quick).
    """
    ctx.obj = {"quick": quick}
    if ctx.invoked_subcommand is not None:
        return
    bound = BOUND_S[quick]
    deadline = time.monotonic() + bound
    skipped = []
    for name, budget in BUDGETS.items():
        allowed = budget.quick if quick else budget.full
        left = deadline - time.monotonic()
        if allowed > left:
            _progress(
                f"== {name}: skipped, its {allowed} s budget no longer fits ({left:.0f} s left)"
            )
            skipped.append(name)
            continue
        began = time.monotonic()
        command = bench.get_command(ctx, name)
        assert command is not None
        ctx.invoke(command)
        took = time.monotonic() - began
        over = " - OVER BUDGET" if took > allowed else ""
        _progress(f"== {name}: {took:.0f} s of its {allowed} s budget{over}")
    total = time.monotonic() - (deadline - bound)
    click.echo(f"all suites: {total:.0f} s (bound {bound} s); report: {report.REPORT}")
    if skipped:
        click.echo(f"skipped (previous results kept in the report): {', '.join(skipped)}")


@bench.command()
@click.pass_context
def limits(ctx: click.Context) -> None:
    """Raw limits: signature checks on one core, broker, COPY, Redis, validation cost."""
    from meterproof.bench.limits import pipeline_rows, run_limits
    from meterproof.bench.profile import validation_cost

    quick = _quick(ctx)
    rows = 10_000 if quick else 50_000
    _progress(f"== limits (signing {rows:,} readings for the database, Redis and validation)")
    fleet = pipeline_rows(50, rows // 50)
    with _run_dir() as tmp:
        measured = run_limits(
            run_dir=tmp,
            reader_name="ingest-0",
            broker_messages=10_000 if quick else 50_000,
            fleet=fleet,
            crypto_seconds=0.5 if quick else 2.0,
            progress=_progress,
        )
    validation = validation_cost(fleet.rows, fleet.keys)
    _progress(
        f"validation in-process: decode {validation.decode_us:.1f} + verify "
        f"{validation.verify_us:.1f} + judge {validation.judge_us:.1f} = "
        f"{validation.total_us:.1f} µs per reading"
    )
    _saved(ctx, "limits", {**measured.as_dict(), "validation": validation.as_dict()})


@bench.command()
@click.option(
    "--meters",
    type=click.IntRange(10, 100_000),
    default=1_000,
    show_default=True,
    help="Fleet size: a device certificate and a registry row for each.",
)
@click.pass_context
def registration(ctx: click.Context, meters: int) -> None:
    """Certificates + registry rows for a fleet, as the two commands and in-process."""
    from meterproof.bench.registration import run_registration

    _progress(f"== registration: {meters:,} meters (certs issue-bulk + meters register --bulk)")
    with _run_dir() as tmp:
        result = run_registration(run_dir=tmp, meters=meters)
    _progress(
        f"   {result.commands_total_s:.2f} s as commands, {result.inprocess_total_s:.2f} s "
        "in-process"
    )
    _saved(ctx, "registration", result.as_dict())


@bench.command()
@click.option(
    "--readings",
    type=click.IntRange(1_000, 1_000_000),
    default=None,
    help="Backlog size (default 200,000; 20,000 with --quick).",
)
@click.option(
    "--workers",
    "worker_counts",
    type=click.IntRange(1, 8),
    multiple=True,
    help="Worker process counts to run (default: 1 and 2).",
)
@click.option(
    "--profile/--no-profile",
    default=True,
    show_default=True,
    help="Per-stage costs from py-spy: a further 1-worker drain of half the backlog "
    "(with --quick, the 1-worker drain itself).",
)
@click.pass_context
def ingest(
    ctx: click.Context, readings: int | None, worker_counts: tuple[int, ...], profile: bool
) -> None:
    """Backlog drain with 1 and 2 workers next to the count-only receive rate."""
    quick = _quick(ctx)
    size = readings or (20_000 if quick else 200_000)
    runs = []
    figures: dict[str, object] = {}
    for workers in worker_counts or (1, 2):
        # --quick profiles its 1-worker drain itself (no time for a further run)
        profiled = profile and quick and workers == 1
        _progress(
            f"== backlog drain: {size:,} readings, {workers} worker(s)"
            + (" (under py-spy)" if profiled else "")
        )
        result, measured = _drain(size, workers, profiled=profiled)
        _progress(
            f"   {result.drain_per_s:,.0f} readings/s stored+acked "
            f"({result.ratio_to_count_only:.0%} of count-only {result.count_only_per_s:,.0f}/s)"
        )
        runs.append(result.as_dict())
        if measured:
            figures["profile"] = {**measured, "run": "the 1-worker drain above"}
    if profile and "profile" not in figures:
        size = max(10_000, size // 2)
        _progress(f"== profile: drain of {size:,} readings, 1 worker, under py-spy")
        result, measured = _drain(size, 1, profiled=True)
        figures["profile"] = {
            **measured,
            "run": "a separate 1-worker drain",
            "drain_per_s": result.drain_per_s,
        }
    _saved(ctx, "ingest", {"runs": runs, **figures})


@bench.command()
@click.pass_context
def consent(ctx: click.Context) -> None:
    """The drain without consents, with 1,000 integrators and 10,000 consents in place, and
    with every drained meter consented to one integrator (one more publish per reading).

    The three run in turn, in rounds (3, or 1 with --quick); each keeps its best round, so
    a burst of load from another process on the shared machine does not decide a ratio.
    """
    from meterproof.bench import consent as seeding
    from meterproof.bench.ingest import run_drain
    from meterproof.bench.load import run_tiers

    quick = _quick(ctx)
    size, rounds, live_s = (10_000, 1, 8.0) if quick else (50_000, 3, 20.0)
    best: dict[str, dict[str, object]] = {}
    live: dict[str, dict[str, float]] = {}
    for turn in range(1, rounds + 1):
        for case, prepare in seeding.CASES.items():
            _progress(f"== round {turn}/{rounds}: {size:,} readings, 2 workers, consents: {case}")
            with _run_dir() as tmp:
                result = run_drain(run_dir=tmp, readings=size, workers=2, progress=_progress,
                                   prepare=prepare)  # fmt: skip
            _progress(f"   {result.drain_per_s:,.0f}/s, {result.cpu_us_per_reading:.0f} µs/reading")
            kept = best.get(case)
            if kept is None or result.drain_per_s > float(str(kept["drain_per_s"])):
                best[case] = result.as_dict()
            _progress(f"== round {turn}/{rounds}: live, {seeding.LIVE_RATE:,}/s, consents: {case}")
            with _run_dir() as tmp:
                tier = run_tiers(tmp, rates=[seeding.LIVE_RATE], seconds_per_tier=live_s,
                                 meters=seeding.LIVE_METERS, workers=2, progress=_progress,
                                 prepare=prepare)["tiers"][0]  # fmt: skip
            figures = seeding.live_figures(tier)
            if case not in live or figures["server_us"] < live[case]["server_us"]:
                live[case] = figures
    _saved(ctx, "consent", {"integrators": seeding.INTEGRATORS, "consents": seeding.CONSENTS,
                            "rounds": rounds, "runs": best, "live": live})  # fmt: skip


def _drain(size: int, workers: int, *, profiled: bool) -> tuple[DrainResult, dict[str, object]]:
    """One drain on a private stack; with `profiled`, py-spy records the workers throughout
    and the stages share out their measured CPU time."""
    from meterproof.bench.ingest import run_drain
    from meterproof.bench.profile import attribute, py_spy

    rate = 200
    with _run_dir() as tmp:
        out = tmp / "profile.txt"
        result = run_drain(
            run_dir=tmp,
            readings=size,
            workers=workers,
            progress=_progress,
            observe=(lambda pid: py_spy(pid, out, rate_hz=rate)) if profiled else _unobserved,
        )
        if not profiled:
            return result, {}
        profile = attribute(
            out.read_text().splitlines(),
            rate_hz=rate,
            readings=result.readings,
            workers=workers,
            cpu_s=result.worker_cpu_s + result.startup_cpu_s["workers"],  # py-spy's span
        )
    _progress(
        f"   {profile.total_us:.0f} µs of worker CPU per reading: "
        + ", ".join(f"{s.stage} {s.us_per_reading:.0f}" for s in profile.stages if s.samples)
    )
    return result, profile.as_dict()


def _unobserved(pid: int) -> AbstractContextManager[object]:
    return nullcontext()


@bench.command()
@click.option(
    "--rates",
    default=None,
    help="Comma-separated offered readings/s (default 1000,2000,5000,10000; 1000,2000 quick).",
)
@click.option("--seconds", type=click.FloatRange(1, 600), default=None, help="Per tier.")
@click.option(
    "--meters",
    type=click.IntRange(2, 20_000),
    default=None,
    help="Meters connected over mutual TLS, publishing the offered rate in turn "
    "(2,000; quick 200).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 8),
    default=2,
    show_default=True,
    help="Ingest worker processes.",
)
@click.option(
    "--search",
    type=click.IntRange(0, 6),
    default=None,
    help="Further tiers halving the gap between the highest sustained rate and the lowest "
    "unsustained one above it, then one at half the highest sustained (default 3; quick 0).",
)
@click.option(
    "--profile/--no-profile",
    default=False,
    show_default=True,
    help="Per tier: py-spy over the workers (stages, µs per reading), perf's split of their "
    "CPU by library (when perf is installed) and PostgreSQL's top statements "
    "(pg_stat_statements); in the raw JSON. py-spy takes CPU of its own.",
)
@click.option(
    "--bridge/--no-bridge",
    default=False,
    show_default=True,
    help="Run the ledger bridge too, claiming what the workers store every 5 s as in a "
    "deployment; its CPU is a group of its own and its statements are PostgreSQL's.",
)
@click.pass_context
def load(
    ctx: click.Context,
    *,
    rates: str | None,
    seconds: float | None,
    meters: int | None,
    workers: int,
    search: int | None,
    profile: bool,
    bridge: bool,
) -> None:
    """Sustained tiers from connected meters: accepted rate, publish->receipt latency, CPU."""
    from meterproof.bench.load import run_tiers

    quick = _quick(ctx)
    tiers = [int(r) for r in rates.split(",")] if rates else (
        [1_000, 2_000] if quick else [1_000, 2_000, 5_000, 10_000]
    )  # fmt: skip
    per_tier = seconds or (4.0 if quick else 15.0)
    fleet = meters or (200 if quick else 2_000)
    steps = search if search is not None else (0 if quick else 3)
    _progress(f"== load: {fleet:,} meters, tiers {tiers} readings/s, {per_tier:g} s each")
    with _run_dir() as tmp:
        figures = run_tiers(
            tmp,
            rates=tiers,
            seconds_per_tier=per_tier,
            meters=fleet,
            workers=workers,
            progress=_progress,
            search_steps=steps,
            profile=profile,
            bridge=bridge,
        )
    for t in figures["tiers"]:
        lat = t.get("latency_ms") or {}
        _progress(
            f"   {t['offered_per_s']:,}/s offered: {t['accepted_per_s']:,.0f}/s accepted, "
            f"p99 {lat.get('p99', float('nan')):,.0f} ms, sustained {t.get('sustained')}"
        )
    _saved(ctx, "load", figures)


def _reporting_options(command: Callable[..., None]) -> Callable[..., None]:
    """`--interval`, `--seconds` and `--workers` of the fleet suites (connections, shards)."""
    for option in reversed(
        (
            click.option(
                "--interval",
                type=click.FloatRange(0.1, 600),
                default=None,
                help="s between a meter's readings (default 5).",
            ),
            click.option(
                "--seconds",
                type=click.FloatRange(1, 600),
                default=None,
                help="Reporting phase (120; quick 3).",
            ),
            click.option(
                "--workers",
                type=click.IntRange(1, 8),
                default=2,
                show_default=True,
                help="Ingest worker processes; each subscribes on every broker.",
            ),
        )
    ):
        command = option(command)
    return command


@bench.command()
@click.option("--meters", type=click.IntRange(2, 40_000), default=None, help="20,000; quick 300.")
@_reporting_options
@click.pass_context
def connections(
    ctx: click.Context,
    meters: int | None,
    interval: float | None,
    seconds: float | None,
    workers: int,
) -> None:
    """Concurrent mutual-TLS meters on one broker, each reporting on an interval."""
    from meterproof.bench.connections import run_connections

    quick = _quick(ctx)
    fleet = meters or (300 if quick else 20_000)
    every = interval or 5.0
    phase = seconds or (3.0 if quick else 120.0)
    _progress(f"== connections: {fleet:,} meters, one reading each every {every:g} s")
    with _run_dir() as tmp:
        figures = run_connections(
            tmp, meters=fleet, interval_s=every, seconds=phase, workers=workers, progress=_progress
        )
    _progress(
        f"   {figures['held']:,} of {fleet:,} held, "
        f"{figures['connect']['handshakes_per_s']:,.0f} handshakes/s, "
        f"ingest kept up: {figures['ingest_kept_up']}"
    )
    _saved(ctx, "connections", figures)


@bench.command()
@click.option("--meters", type=click.IntRange(2, 150_000), default=None, help="50,000; quick 600.")
@click.option(
    "--brokers",
    type=click.IntRange(2, 8),
    default=3,
    show_default=True,
    help="Brokers on this machine; each meter uses the one a hash of its id names.",
)
@_reporting_options
@click.pass_context
def shards(
    ctx: click.Context,
    *,
    meters: int | None,
    brokers: int,
    interval: float | None,
    seconds: float | None,
    workers: int,
) -> None:
    """Concurrent mutual-TLS meters sharded over several brokers, each reporting on an
    interval; every worker subscribes on each broker.

    Not part of the full run: 50,000 meters every 5 s took 8-9 minutes and about 12 GB
    of memory here (10.4 GB of it the generators'). It reports the generators' memory per
    meter too.
    """
    from meterproof.bench.connections import run_connections

    quick = _quick(ctx)
    fleet = meters or (600 if quick else 50_000)
    every = interval or 5.0
    phase = seconds or (3.0 if quick else 120.0)
    _progress(
        f"== shards: {fleet:,} meters over {brokers} brokers, one reading each every {every:g} s"
    )
    with _run_dir() as tmp:
        figures = run_connections(
            tmp,
            meters=fleet,
            interval_s=every,
            seconds=phase,
            workers=workers,
            progress=_progress,
            brokers=brokers,
        )
    _progress(
        f"   {figures['held']:,} of {fleet:,} held over {brokers} brokers "
        f"{figures['connect']['per_broker']}, ingest kept up: {figures['ingest_kept_up']}"
    )
    _saved(ctx, "shards", figures)


@bench.command()
@click.option(
    "--baseline",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Another checkout (e.g. `git worktree add /tmp/base <commit>`) with its own .venv.",
)
@click.option("--label", default="", help="What changed, for the report.")
@click.option(
    "--rounds",
    type=click.IntRange(1, 10),
    default=3,
    show_default=True,
    help="Each a drain of the baseline and one of this checkout, the baseline first in odd "
    "rounds and second in even ones: more rounds, steadier means, longer runs.",
)
@click.option(
    "--readings",
    type=click.IntRange(1_000, 1_000_000),
    default=100_000,
    show_default=True,
    help="Backlog size of each drain.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 8),
    default=2,
    show_default=True,
    help="Ingest worker processes in each drain (and each --live run).",
)
@click.option(
    "--live",
    default=None,
    help="Comma-separated offered readings/s: each round also runs each side's `bench load` "
    "at these rates (15 s each, 2,000 meters) and compares server CPU per accepted reading.",
)
@click.pass_context
def compare(
    ctx: click.Context,
    *,
    baseline: Path,
    label: str,
    rounds: int,
    readings: int,
    workers: int,
    live: str | None,
) -> None:
    """Backlog drains of --baseline and of this checkout, alternated round by round on this
    machine, and the ratio of their means (drain rate, worker CPU per reading); with
    --live, live tiers too."""
    from meterproof.bench.compare import CompareIncompleteError, run_compare

    try:
        rates = [int(r) for r in live.split(",")] if live else []
    except ValueError:
        raise click.BadParameter(f"not a list of rates: {live!r}", param_hint="--live") from None
    if any(r <= 0 for r in rates):
        raise click.BadParameter("rates must be positive", param_hint="--live")
    _progress(f"== compare: {rounds} rounds of {readings:,} readings, {workers} worker(s)")
    try:
        figures = run_compare(
            baseline,
            Path.cwd(),
            label=label,
            rounds=rounds,
            readings=readings,
            workers=workers,
            progress=_progress,
            live=rates,
        )
    except CompareIncompleteError as exc:
        _saved(ctx, "compare", exc.figures)  # the finished rounds, marked incomplete
        raise
    ratio = figures["ratio"]
    _progress(
        f"   current/baseline: drain {ratio['drain_per_s']:.3f}, "
        f"worker CPU per reading {ratio['cpu_us_per_reading']:.3f}"
    )
    _saved(ctx, "compare", figures)


@bench.command()
@click.pass_context
def bridge(ctx: click.Context) -> None:
    """Seal + anchor of one epoch, and `ledger verify` of all of it, on a private database."""
    from dataclasses import asdict

    from meterproof.bench.bridge import bench_bridge
    from meterproof.db.migrate import migrate
    from meterproof.stack.postgres import PostgresServer

    size = 100_000 if _quick(ctx) else 1_000_000
    _progress(f"== bridge: seal, anchor and verify an epoch of {size:,} readings")
    with _run_dir() as tmp:
        server = PostgresServer(directory=tmp)
        server.start()
        try:
            migrate(server.url)
            result = bench_bridge(server.url, readings=size, meters=min(10_000, size // 10))
        finally:
            server.stop()
    _progress(
        f"   seal+anchor {result.seal_and_anchor_s:.1f} s, ledger verify {result.verify_s:.1f} s"
    )
    _saved(ctx, "bridge", {**asdict(result), "seal_and_anchor_s": result.seal_and_anchor_s})


@bench.command()
@click.option(
    "--meters", type=click.IntRange(1, 1_000), default=None, help="Fleet loaded (20; quick 4)."
)
@click.option(
    "--days",
    type=click.IntRange(1, 60),
    default=None,
    help="Days of history per meter, one reading every 5 s (30: 10,368,000 readings with 20 "
    "meters; quick 3).",
)
@click.option(
    "--clients",
    type=click.IntRange(1, 20),
    default=None,
    help="Meters submitting a day each at once through the batch endpoint (4; quick 1).",
)
@click.pass_context
def api(ctx: click.Context, meters: int | None, days: int | None, clients: int | None) -> None:
    """The HTTP API with 10 million readings stored: latest, a meter-day of history and a
    month of rollups over HTTPS; batch submission next to the MQTT drain of the same run."""
    from meterproof.bench.api import run_api_bench

    quick = _quick(ctx)
    fleet = meters or (4 if quick else 20)
    span = days or (3 if quick else 30)
    writers = min(fleet, clients or (1 if quick else 4))
    _progress(f"== api: {fleet} meters x {span} days stored, {writers} submitting client(s)")
    with _run_dir() as tmp:
        figures = run_api_bench(
            run_dir=tmp,
            meters=fleet,
            days=span,
            clients=writers,
            reads=100 if quick else 1000,  # a p99 of 100 reads would be their slowest
            drain_readings=10_000 if quick else 50_000,
            progress=_progress,
        )
    r = figures["reads"]
    _progress(
        f"   latest p99 {r['latest']['p99_ms']:.1f} ms, day of history p99 "
        f"{r['history_json']['p99_ms']:.0f} ms (JSON) / {r['history_csv']['p99_ms']:.0f} ms (CSV), "
        f"month of 15m rollups p99 {r['rollups_15m']['p99_ms']:.0f} ms; batch "
        f"{figures['batch']['per_s']:,.0f}/s vs drain {figures['drain']['drain_per_s']:,.0f}/s"
    )
    _saved(ctx, "api", figures)


@bench.command()
@click.option("--claims", type=click.IntRange(2, 512), default=None, help="Sampled per tree.")
@click.pass_context
def chain(ctx: click.Context, claims: int | None) -> None:
    """GRID on a ganache dev node: gas and seconds per epoch at 1,000 / 100,000 / 1,000,000
    meters (direct mints against the claim tree), and epoch close -> N confirmations.
    Not part of the default run (it needs `make setup`'s node_modules); about 2 minutes."""
    from meterproof.bench.chain import SIZES, run_chain

    quick = _quick(ctx)
    sizes = SIZES[:2] if quick else SIZES
    sample = claims or (8 if quick else 32)
    _progress(f"== chain: claim trees of {', '.join(f'{n:,}' for n in sizes)} leaves")
    with _run_dir() as tmp:
        figures = run_chain(tmp, sizes=sizes, claims=sample, progress=_progress)
    _saved(ctx, "chain", figures)
