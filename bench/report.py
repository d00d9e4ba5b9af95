"""Raw results as JSON under bench/results/, and docs/benchmarks.md rendered from the
latest result of each suite, so the report never shows a figure nobody measured: a suite
that has not run leaves its section (and its rows of the targets table) out."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from meterproof.bench import plots
from meterproof.bench.compare import OLDER_ACCOUNTING, server_cost
from meterproof.bench.loadgen.legs import LEGS
from meterproof.bench.sampling import Verdict, at_least, at_most, below

RESULTS: Final = Path("bench/results")
REPORT: Final = Path("docs/benchmarks.md")
SUITES: Final = (
    "limits", "ingest", "registration", "load", "connections", "shards", "bridge", "consent",
    "compare", "chain", "api",
)  # fmt: skip

Data = dict[str, Any]

#: The issue's own figures for what an operator would pick instead; quoted, not measured.
PEERS: Final = (
    ("hand-written paho + PyNaCl + INSERT", "~2,500 readings/s", "drain"),
    ("Node-RED flow", "~3,200 readings/s", "drain"),
    ("PyPI MQTT -> PostgreSQL bridge, no signature checks", "~22,000 readings/s", "drain"),
    ("mosquitto_sub, count only", "~110,000 msg/s", "receive"),
    ("raw COPY into PostgreSQL", "~300,000 rows/s", "copy"),
)


def save(
    suite: str, machine: dict[str, str], figures: dict[str, Any], *, quick: bool = False
) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{suite}-{stamp}.json"
    data = {"suite": suite, "quick": quick, "machine": machine, "figures": figures}
    path.write_text(json.dumps(data, indent=2))
    return path


def latest(suite: str, results: Path = RESULTS) -> Data | None:
    found = sorted(results.glob(f"{suite}-*.json"))
    if not found:
        return None
    data: Data = json.loads(found[-1].read_text())
    data["file"] = str(found[-1])
    return data


def _workers(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _measured(data: Data) -> str:
    quick = " with `--quick` (small sizes: startup weighs more)" if data.get("quick") else ""
    return f"Measured {data['machine']['date']}{quick}; raw: `{data['file']}`."


def _best_drain(ingest: Data) -> Data:
    runs: list[Data] = ingest["figures"]["runs"]
    return max(runs, key=lambda r: r["drain_per_s"])


def _validation_us(limits: Data | None) -> float | None:
    if limits is None or "validation" not in limits["figures"]:
        return None
    return float(limits["figures"]["validation"]["total_us"])


def _profile_validation_us(ingest: Data | None) -> float | None:
    profile = None if ingest is None else ingest["figures"].get("profile")
    if not profile:
        return None
    costs = {s["stage"]: s["us_per_reading"] for s in profile["stages"]}
    return float(sum(costs.get(k, 0.0) for k in ("decode", "verify", "judge (rules 7-9)")))


TargetRow = tuple[str, str, Verdict]


def _load_targets(load: Data | None, ingest: Data | None) -> list[TargetRow]:
    """Sustained 10,000/s; p99 publish -> receipt < 50 ms at the tier nearest to half of
    the highest sustained rate (at or below it); and issue 17's server CPU per reading."""
    if load is None:
        return []
    f = load["figures"]
    best = f.get("max_sustained_per_s") or 0
    rows: list[TargetRow] = [
        (
            "sustained 10,000 verified readings/s end to end (receipts + republish on)",
            f"{_n(best)}/s highest sustained tier ({_n(f['meters'])} meters)",
            at_least(best, 10_000),
        )
    ]
    below_half = [t for t in f["tiers"] if t["sustained"] and t["offered_per_s"] <= best / 2]
    if below_half:
        tier = max(below_half, key=lambda t: t["offered_per_s"])
        p99 = tier["latency_ms"]["p99"]
        rows.append(
            (
                "p99 publish -> receipt < 50 ms at half the highest sustained rate",
                f"{p99:,.0f} ms at {_n(tier['offered_per_s'])}/s",
                below(p99, 50.0),
            )
        )
    top = _highest_sustained(f["tiers"])
    if top is not None and (server := _server_us(top)):
        total = sum(server.values())
        rows.append(
            (
                f"server CPU ({_server_parts(server)}) per accepted reading at the highest "
                "sustained tier <= 150 µs (issue 17)",
                f"{total:,.0f} µs at {_n(top['offered_per_s'])}/s ({_groups_us(server)})",
                at_most(total, 150.0),
            )
        )
    drain = _drain_with(ingest, f["workers"])
    trickle = [t for t in f["tiers"] if t["sustained"] and t["offered_per_s"] in (1_000, 2_000)]
    if ingest is not None and drain is not None and trickle:
        drain_us = sum(drain["server_us_per_reading"].values())
        costs = {t["offered_per_s"]: server_cost(t)["server_us_per_reading"] for t in trickle}
        measured = ", ".join(
            f"{us:,.0f} µs at {_n(rate)}/s ({us / drain_us:.1f}x)"
            for rate, us in sorted(costs.items())
        )
        rows.append(
            (
                "server CPU per reading at 1,000/s and 2,000/s within 2x of the backlog "
                "drain's (issue 17)",
                f"{measured}; drain {drain_us:,.0f} µs ({_workers(drain['workers'])}, "
                f"{ingest['machine']['date']})",
                at_most(max(costs.values()) / drain_us, 2.0),
            )
        )
    return rows


def _highest_sustained(tiers: list[Data]) -> Data | None:
    held = [t for t in tiers if t.get("sustained")]
    return max(held, key=lambda t: t["offered_per_s"]) if held else None


def _server_us(tier: Data) -> dict[str, float]:
    """CPU µs per accepted reading of the stack's own processes (the generator left out)."""
    groups: dict[str, float] = server_cost(tier)["us_per_reading"]
    return groups


_SERVER_NAMES: Final = {"postgres": "PostgreSQL", "redis": "Redis"}


def _server_parts(per: dict[str, float]) -> str:
    """The server's groups as the target row names them, "+ bridge" when it ran."""
    return " + ".join(_SERVER_NAMES.get(g, g) for g in per)


def _groups_us(per: dict[str, float]) -> str:
    return ", ".join(f"{g} {v:,.0f}" for g, v in sorted(per.items(), key=lambda kv: -kv[1]))


def _drain_with(ingest: Data | None, workers: int) -> Data | None:
    """The drain with as many workers as the live tiers had, when it measured the servers'
    CPU (results from 2026-12-05 on)."""
    runs = [] if ingest is None else ingest["figures"]["runs"]
    same = [r for r in runs if r["workers"] == workers and "server_us_per_reading" in r]
    return same[0] if same else None


def targets(found: dict[str, Data]) -> list[TargetRow]:
    """(target, measured, verdict) for every target whose suite has a result."""
    rows: list[TargetRow] = []
    ingest = found.get("ingest")
    if ingest is not None:
        best = _best_drain(ingest)
        rows.append(
            (
                "backlog drain >= 22,000 verified readings/s",
                f"{_n(best['drain_per_s'])}/s ({_workers(best['workers'])})",
                at_least(best["drain_per_s"], 22_000),
            )
        )
        rows.append(
            (
                "backlog drain >= 50% of the count-only receive rate",
                f"{best['ratio_to_count_only']:.0%} of {_n(best['count_only_per_s'])}/s",
                at_least(best["ratio_to_count_only"], 0.5),
            )
        )
        two = [r for r in ingest["figures"]["runs"] if r["workers"] == 2]
        if two:
            rows.append(
                (
                    "backlog drain >= 5,000 readings/s with two workers (issue 3)",
                    f"{_n(two[0]['drain_per_s'])}/s",
                    at_least(two[0]["drain_per_s"], 5_000),
                )
            )
    registration = found.get("registration")
    if registration is not None:
        f = registration["figures"]
        rows.append(
            (
                f"{f['meters']:,} registrations (certificates + registry rows) < 2 s",
                f"{f['commands_total_s']:.2f} s as two commands "
                f"({f['inprocess_total_s']:.2f} s in-process)",
                below(f["commands_total_s"], 2.0),
            )
        )
    validation = _validation_us(found.get("limits"))
    if validation is not None:
        profiled = _profile_validation_us(ingest)
        also = "" if profiled is None else f"; {profiled:,.0f} µs in the drain profile"
        rows.append(
            (
                "validation (decode + verify + checks) < 1 ms of CPU per reading",
                f"{validation:,.0f} µs in-process{also}",
                below(validation, 1_000.0),
            )
        )
    rows += _load_targets(found.get("load"), ingest)
    conns = found.get("connections")
    if conns is not None and conns["figures"]["meters"] >= 20_000:  # the target's size
        f = conns["figures"]
        cap = f.get("broker_limits") or {}
        files = cap.get("open_files")
        why = (
            f" (the cap: {files:,} open files per process, of which the broker keeps "
            f"{files - cap['max_connections']:,} for itself, and {f['workers']} connections "
            "are the workers')"
            if files and cap.get("max_connections")
            else ""
        )
        rows.append(
            (
                "20,000 concurrent mutual-TLS meters on one broker, each reporting every 5 s "
                "for >= 2 minutes, ingest keeping up",
                f"{f['held']:,} held{why}; every {f['interval_s']:g} s for {f['seconds']:g} s: "
                f"{_n(f['reporting']['accepted_per_s'])}/s accepted; ingest kept up: "
                f"{'yes' if f['ingest_kept_up'] else 'no'}",
                at_least(_held_while_reporting(f), 20_000),
            )
        )
    shards = found.get("shards")
    if shards is not None and shards["figures"]["meters"] >= 50_000:  # the target's size
        f = shards["figures"]
        rows.append(
            (
                "50,000 mutual-TLS meters over three brokers, each reporting every 5 s for "
                "2 minutes, ingest keeping up (issue 17)",
                f"{f['held']:,} held over {f['brokers']} brokers; every {f['interval_s']:g} s "
                f"for {f['seconds']:g} s: {_n(f['offered_per_s'])}/s offered, "
                f"{_n(f['reporting']['accepted_per_s'])}/s accepted; ingest kept up: "
                f"{'yes' if f['ingest_kept_up'] else 'no'}; generators "
                f"{f['generator_memory']['per_meter_kib']:,.0f} KiB per meter",
                at_least(_held_while_reporting(f), 50_000),
            )
        )
    bridge = found.get("bridge")
    if bridge is not None and bridge["figures"]["readings"] >= 1_000_000:  # the target's size
        f = bridge["figures"]
        rows.append(
            (
                f"seal + anchor of {f['readings']:,} readings < 10 s (issue 4)",
                f"{f['seal_and_anchor_s']:.1f} s",
                below(f["seal_and_anchor_s"], 10.0),
            )
        )
        rows.append(
            (
                f"ledger verify of {f['readings']:,} readings < 30 s (issue 4)",
                f"{f['verify_s']:.1f} s",
                below(f["verify_s"], 30.0),
            )
        )
    rows += _api_targets(found.get("api"))
    return rows


def _api_targets(api: Data | None) -> list[TargetRow]:
    """Issue 13's read targets (only at their size: 10 million readings stored) and the
    batch submission rate."""
    if api is None:
        return []
    f = api["figures"]
    reads, stored = f["reads"], f"{f['stored']:,} readings stored"
    rows: list[TargetRow] = []
    if f["stored"] >= 10_000_000:
        day, latest = reads["history_json"], reads["latest"]
        month = max(reads[f"rollups_{w}"]["p99_ms"] for w in ("15m", "1h", "1d"))
        rows += [
            (
                "API: history of one meter-day (17,280 readings) p99 < 50 ms, 10 million stored",
                f"{day['p99_ms']:,.0f} ms as JSON in one page "
                f"(CSV: {reads['history_csv']['p99_ms']:,.0f} ms); {stored}",
                below(day["p99_ms"], 50.0),
            ),
            (
                "API: latest p99 < 10 ms, 10 million stored",
                f"{latest['p99_ms']:.1f} ms; {stored}",
                below(latest["p99_ms"], 10.0),
            ),
            (
                "API: rollups for a month of one meter < 50 ms",
                f"{month:.1f} ms, the slowest width's p99",
                below(month, 50.0),
            ),
        ]
    batch = f["batch"]
    rows.append(
        (
            "API: batch submission 10,000 records/s (seed 000)",
            f"{_n(batch['per_s'])}/s ({batch['clients']} clients); MQTT drain of the same run "
            f"{_n(f['drain']['drain_per_s'])}/s",
            at_least(batch["per_s"], 10_000),
        )
    )
    return rows


def _targets_section(found: dict[str, Data]) -> list[str]:
    rows = targets(found)
    if not rows:
        return []
    return [
        "## Targets",
        "",
        "Ratio is measured / target for rates and target / measured for times and costs, so",
        "above 1.00 is better than the target.",
        "",
        "| target | measured | met | ratio |",
        "|---|---|---|---|",
        *(f"| {t} | {m} | {'yes' if v.met else '**no**'} | {v.ratio:.2f} |" for t, m, v in rows),
        "",
    ]


def _limits(data: Data, found: dict[str, Data]) -> list[str]:
    f = data["figures"]
    crypto = [
        f"| {c['key']} ({c['alg']}) | {_n(c['verify_per_s'])} | {_n(c['sign_per_s'])} |"
        for c in f["crypto"]
    ]
    b, c, r = f["broker"], f["copy"], f["redis"]
    lines = [
        "## Limits of this machine (same run)",
        "",
        "Each part alone, doing the operation the pipeline needs from it.",
        "",
        "| signature check, one pinned core | verify/s | sign/s |",
        "|---|---|---|",
        *crypto,
        "",
        "| limit | figure | how |",
        "|---|---|---|",
        f"| broker: QoS 1 over mutual TLS | {_n(b['per_s'])} msg/s | `mosquitto_pub --repeat "
        f"{b['messages']:,}` ({b['publisher']}) -> `mosquitto_sub -C` ({b['subscriber']}), "
        f"{b['payload_bytes']}-byte payloads, MQTT 5 |",
    ]
    ingest = found.get("ingest")
    if ingest is not None:
        best = _best_drain(ingest)
        lines.append(
            f"| receive: count-only gmqtt subscriber | {_n(best['count_only_per_s'])} msg/s | "
            f"the drain's own backlog of {best['readings']:,}, through a second share group "
            "(see the drain below) |"
        )
    lines += [
        f"| database: binary COPY into `readings` | {_n(c['readings_per_s'])} rows/s | "
        f"{c['rows']:,} pipeline rows, {c['batch']:,} per transaction, fsync on |",
        f"| database: `reading_log` + `readings` (the store's rows, by COPY) "
        f"| {_n(c['both_tables_per_s'])} readings/s | same rows, both COPYs per transaction |",
        f"| Redis: replay check (MGET + pipelined SET EX) | {_n(r['readings_per_s'])} readings/s "
        f"| `RedisReplayCache.lookup` + `remember`, {r['batch']:,} per batch "
        f"({_n(r['commands_per_s'])} commands/s) |",
        "",
    ]
    v = f.get("validation")
    if v is not None:
        lines += [
            f"Validation measured directly (in-process, one pinned core, {v['readings']:,}",
            f"pre-signed Ed25519 readings in batches of {v['batch']:,}): decode",
            f"{v['decode_us']:.1f} µs + verify {v['verify_us']:.1f} µs + judge",
            f"{v['judge_us']:.1f} µs = **{v['total_us']:.1f} µs per reading**.",
            "",
        ]
    return [*lines, _measured(data), ""]


def _peers(found: dict[str, Data]) -> list[str]:
    ours: dict[str, str] = {}
    ingest, limits = found.get("ingest"), found.get("limits")
    if ingest is not None:
        best = _best_drain(ingest)
        ours["drain"] = (
            f"{_n(best['drain_per_s'])} verified readings/s (drain, {_workers(best['workers'])})"
        )
        ours["receive"] = f"{_n(best['count_only_per_s'])} msg/s (gmqtt count-only)"
    if limits is not None:
        ours["copy"] = f"{_n(limits['figures']['copy']['readings_per_s'])} rows/s"
    return [
        "## What users would pick instead (the issue's figures, not measured here)",
        "",
        "Quoted from the issue for context; we did not run these. Our figure beside each is",
        "the comparable one measured above, on this machine.",
        "",
        "| alternative | issue's figure | ours |",
        "|---|---|---|",
        *(f"| {name} | {figure} | {ours.get(kind, '-')} |" for name, figure, kind in PEERS),
        "",
    ]


def _cpu(run: Data) -> str:
    return f"{run['cpu_us_per_reading']:,.0f}" if "cpu_us_per_reading" in run else "-"


def _drain_window(runs: list[Data]) -> list[str]:
    """What the drain's time and CPU count: from every worker ready (results from
    2026-12-07 on, which hold `ready_s`), or from starting them (older ones)."""
    if all("ready_s" in r for r in runs):
        return [
            "workers start. The drain time runs from the moment every worker answers /readyz",
            "until every reading is committed in PostgreSQL (fsync on) and acknowledged; the",
            "readings stored before that moment are left out of the rate, as the live tiers",
            "count their publishing window only. Worker CPU is user + system time of the",
            "worker processes over the same time, per reading drained in it; their start-up",
            "(imports, TLS, connects) is left out:",
            f"{_startup(runs)}.",
            "The steady rate counts from the first commit to the last; targets are judged on",
            "the headline rate.",
        ]
    return [
        "workers start. The drain time runs from starting the worker processes (imports and",
        "connects included) until every reading is committed in PostgreSQL (fsync on) and",
        "acknowledged. Worker CPU is user + system time of the worker processes (startup",
        "included) over the readings drained. The steady rate counts from the first commit to",
        "the last, leaving the workers' start-up out; targets are judged on the headline rate.",
    ]


def _startup(runs: list[Data]) -> str:
    return ", ".join(
        f"{r['ready_s']:.1f} s until ready and {r['startup_cpu_s']['workers']:.1f} s of CPU "
        f"with {_workers(r['workers'])}"
        for r in runs
    )


def _steady(run: Data) -> str:
    """Stored per second from the first commit to the last: the drain without the time
    until the first commit (the workers' start-up, cache warm-up)."""
    samples = [(t, n) for t, n in run.get("samples") or [] if n > 0]
    if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
        return "-"
    (t0, n0), (t1, n1) = samples[0], samples[-1]
    return _n((n1 - n0) / (t1 - t0))


def _server_cell(run: Data) -> str:
    per = run.get("server_us_per_reading")
    return f"{sum(per.values()):,.0f} ({_groups_us(per)})" if per else "-"


def _ingest(data: Data, found: dict[str, Data]) -> list[str]:
    f = data["figures"]
    rows = [
        f"| {run['workers']} | {run['readings']:,} | {_n(run['drain_per_s'])} | {_steady(run)} "
        f"| {_n(run['count_only_per_s'])} | {run['ratio_to_count_only']:.0%} "
        f"| {run['drain_s']:.1f} s | {_cpu(run)} | {_server_cell(run)} |"
        for run in f["runs"]
    ]
    lines = [
        "## Backlog drain",
        "",
        f"A backlog of pre-signed Ed25519 readings ({f['runs'][0]['meters']} meters, mutual TLS,",
        "QoS 1) is queued in Mosquitto for the workers' persistent sessions and, through a",
        "second share group, for a count-only gmqtt subscriber that acknowledges on arrival",
        "(the raw receive limit). The count-only subscriber drains its copy first; then the",
        *_drain_window(f["runs"]),
        "Server CPU adds the broker's, PostgreSQL's and Redis's over the same time, sampled as",
        "the live tiers sample them.",
        "",
        "| workers | readings | stored + acked /s | steady /s | count-only receive /s | ratio "
        "| drain time | worker CPU µs / reading | server CPU µs / reading |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if any(r.get("samples") for r in f["runs"]):
        lines += ["![throughput over time](img/bench-throughput.png)", ""]
    lines += ["![scaling](img/bench-scaling.png)", ""]
    profile = f.get("profile")
    if profile:
        lines += _profile(profile, found)
    return [*lines, _measured(data), ""]


def _profile(p: Data, found: dict[str, Data]) -> list[str]:
    total = p["total_us_per_reading"]
    rows = [
        f"| {s['stage']} | {s['samples']:,} | {s['us_per_reading']:.1f} "
        f"| {s['us_per_reading'] / total:.0%} |"
        for s in p["stages"]
        if s["samples"]
    ]
    lines = [
        "### Per-stage cost (from a profile of a drain run)",
        "",
        f"py-spy sampled the worker process ({p['rate_hz']} Hz, non-blocking, idle threads",
        f"left out) during {p.get('run', 'a separate 1-worker drain')} ({p['readings']:,}",
        "readings). Each stack counts for the stage of its deepest frame that names one",
        "(`bench/profile.py` has the rules). "
        + (
            f"The samples share out the workers' measured CPU time ({p['cpu_s']:.1f} s, "
            "user + system, from the kernel), so the column adds up to real CPU per reading."
            if p.get("cpu_s")
            else "µs per reading = samples / rate / readings."
        ),
        f"Process start and imports ({p['startup_samples']:,} samples) are left out.",
        "",
        "| stage | samples | CPU µs per reading | share |",
        "|---|---|---|---|",
        *rows,
        f"| **total** | {p['samples'] - p['startup_samples']:,} | **{total:.1f}** | 100% |",
        "",
    ]
    best = _best_drain(found["ingest"])
    reach = "out of reach" if best["drain_per_s"] < 22_000 else "within reach"
    lines += [
        f"**Why 22,000 readings/s is {reach} on this machine:** the best drain reached "
        f"{_n(best['drain_per_s'])}/s ({best['drain_per_s'] / 22_000:.0%} of the target). At "
        f"{total:.0f} µs of worker CPU per reading, 22,000 readings/s need "
        f"{total * 22_000 / 1e6:.1f} cores for the workers alone, and one fully busy core "
        f"drains at most {1e6 / total:,.0f} readings/s; this machine has "
        f"{found['ingest']['machine']['cores']} cores, shared with Mosquitto, PostgreSQL, "
        "Redis and the benchmark's own clients.",
    ]
    if "cpu_us_per_reading" in best:
        busy = best["cpu_us_per_reading"] * best["drain_per_s"] / 1e6
        lines.append(
            f"During that drain the workers used {busy:.2f} cores "
            f"({best['cpu_us_per_reading']:,.0f} µs per reading x {_n(best['drain_per_s'])}/s): "
            + (
                "they were waiting much of the time (commits, the broker, the shared cores), "
                "so CPU per reading is not the only limit."
                if busy < 0.8 * best["workers"]
                else "they were CPU-bound."
            )
        )
    limits = found.get("limits")
    if limits is not None:
        ed = next(c for c in limits["figures"]["crypto"] if c["alg"] == "EdDSA")
        lines.append(
            f"Signature checking alone costs {1e6 / ed['verify_per_s']:.0f} µs per reading "
            f"({_n(ed['verify_per_s'])} Ed25519 verify/s on one core), so 22,000/s need "
            f"{22_000 / ed['verify_per_s']:.2f} cores for verify alone, before receiving, "
            "storing and publishing."
        )
    return [*lines, ""]


def _registration(data: Data, found: dict[str, Data]) -> list[str]:
    f = data["figures"]
    return [
        "## Registration",
        "",
        f"{f['meters']:,} meters on a private PKI and database: device certificates and keys",
        "(`certs issue-bulk`, which writes the summary CSV), then the registry rows",
        "(`meters register --bulk` of that CSV). As commands, each a fresh process; and the",
        "same library calls in one process.",
        "",
        "| step | as commands | in-process |",
        "|---|---|---|",
        f"| certificates + keys + CSV | {f['commands_issue_s']:.2f} s "
        f"| {f['inprocess_issue_s'] + f['inprocess_csv_s']:.2f} s |",
        f"| registry rows | {f['commands_register_s']:.2f} s | {f['inprocess_register_s']:.2f} s |",
        f"| **total** | **{f['commands_total_s']:.2f} s** | {f['inprocess_total_s']:.2f} s |",
        "",
        _measured(data),
        "",
    ]


def _cpu_per_reading(tier: Data) -> dict[str, float]:
    """CPU µs per accepted reading by process group: cores busy / accepted per second."""
    cores = (tier.get("cpu") or {}).get("cores", {})
    rate = tier["accepted_per_s"]
    return {g: v * 1e6 / rate for g, v in cores.items()} if rate else {}


def _load_ceiling(data: Data, ingest: Data | None) -> list[str]:
    """Why the machine stops where it does: everything's CPU per reading at the highest
    sustained tier, against the cores there are, and the servers' part against the drain."""
    tier = _highest_sustained(data["figures"]["tiers"])
    per = {} if tier is None else _cpu_per_reading(tier)
    cores = int(data["machine"].get("cores") or 0)
    total = sum(per.values())
    if tier is None or not cores or not total:
        return []
    ceiling = cores * 1e6 / total
    need = 10_000 * total / 1e6
    parts = " + ".join(f"{g} {v:,.0f}" for g, v in sorted(per.items(), key=lambda kv: -kv[1]))
    return [
        f"**Why this machine stops there:** at {_n(tier['offered_per_s'])}/s every accepted "
        f"reading cost {total:,.0f} µs of CPU in all ({parts}). {cores} cores give at most "
        f"{_n(ceiling)} readings/s at that cost; 10,000/s would need {need:.1f} cores, or "
        f"{1e6 * cores / 10_000:,.0f} µs per reading for everything together."
        + _against_drain(tier, ingest, data["figures"]["workers"]),
        "",
    ]


def _against_drain(tier: Data, ingest: Data | None, workers: int) -> str:
    """The same tier's servers (or, for drains that did not measure them, its workers)
    next to the backlog drain's with as many workers."""
    drain = _drain_with(ingest, workers)
    if drain is not None:
        server, drained = _server_us(tier), drain["server_us_per_reading"]
        return (
            f" The servers' part, {sum(server.values()):,.0f} µs, compares with "
            f"{sum(drained.values()):,.0f} µs per reading in the backlog drain with "
            f"{_workers(workers)} ({_groups_us(drained)})."
        )
    if ingest is not None and "cpu_us_per_reading" in _best_drain(ingest):
        return (
            f" The workers' part compares with {_best_drain(ingest)['cpu_us_per_reading']:,.0f}"
            " µs per reading in the backlog drain."
        )
    return ""


def _bridge_in_load(f: Data) -> str:
    """Whether the run's figures include the ledger bridge's claims."""
    if f.get("bridge"):
        return (
            "The ledger bridge ran beside the workers with its defaults (a claim every 5 s), "
            "as in a deployment; its claims are PostgreSQL's CPU."
        )
    return (
        "No ledger bridge ran (as in the backlog drain): a deployment's bridge claims every "
        "stored reading, which costs PostgreSQL more (`meterproof bench load --bridge`; "
        'docs/scaling.md, "The ledger bridge in the live bench").'
    )


def _broker_calls(tiers: list[Data]) -> list[str]:
    """The broker's read and write calls per accepted reading, tier by tier: one write is
    one packet, so this shows what a reading costs it in packets (runs since 2026-12-06)."""
    parts = []
    for t in sorted(tiers, key=lambda t: t["offered_per_s"]):
        calls = ((t.get("cpu") or {}).get("rw_calls_per_s") or {}).get("broker")
        if calls and t["accepted_per_s"]:
            r, w = (calls[k] / t["accepted_per_s"] for k in ("read", "write"))
            parts.append(f"{_n(t['offered_per_s'])}/s {r:.1f} + {w:.1f}")
    if not parts:
        return []
    return [
        "The broker's read + write calls per accepted reading (one write per packet, as "
        f"Mosquitto sends them): {'; '.join(parts)} "
        '(docs/scaling.md, "What the 1,000/s tier still pays for").',
        "",
    ]


def _latency_legs(tiers: list[Data]) -> list[str]:
    """Where each tier's publish -> receipt time went, by the worker's and the store's
    timestamps (`bench.loadgen.legs`; runs since 2026-12-06)."""
    measured = [t for t in tiers if (t.get("legs_ms") or {}).get("count")]
    if not measured:
        return []
    rows = []
    for t in sorted(measured, key=lambda t: t["offered_per_s"]):
        split = t["legs_ms"]
        cells = " | ".join(
            f"{split['legs'][name]['p50']:,.1f} / {split['legs'][name]['slowest_mean']:,.1f}"
            for name in LEGS
        )
        rows.append(f"| {_n(t['offered_per_s'])} | {split['p99_ms']:,.0f} | {cells} |")
    return [
        "Where the time to a receipt goes, from the times the worker received, verified and "
        "stored each accepted reading (ms; each leg's median / its mean over the slowest 1%, "
        "the readings at or above the p99): *to the worker* is the broker's delivery, *in the "
        "batch* the wait for the batch to close, *to the transaction* decode, verify and the "
        "replay check, *commit and back* the transaction and the receipt's way back.",
        "",
        f"| offered /s | p99 | {' | '.join(LEGS)} |",
        "|---" * (len(LEGS) + 2) + "|",
        *rows,
        "",
    ]


def _load(data: Data, found: dict[str, Data]) -> list[str]:
    f = data["figures"]
    rows = []
    for t in sorted(f["tiers"], key=lambda t: t["offered_per_s"]):
        lat = t.get("latency_ms") or {}
        cores = (t.get("cpu") or {}).get("cores", {})
        cpu = ", ".join(f"{g} {v:.2f}" for g, v in cores.items())
        p = " / ".join(f"{lat[q]:,.0f}" if q in lat else "-" for q in ("p50", "p95", "p99"))
        per_reading = _cpu_per_reading(t)
        per = ", ".join(f"{g} {v:,.0f}" for g, v in per_reading.items())
        total = f" (all {sum(per_reading.values()):,.0f})" if per_reading else ""
        probe = {"search": " (searched)", "half of the highest sustained": " (half)"}.get(
            t.get("probe", ""), ""
        )
        rows.append(
            f"| {_n(t['offered_per_s'])}{probe} | {_n(t['published_per_s'])} "
            f"| {_n(t['accepted_per_s'])} | {p} | {'yes' if t.get('sustained') else 'no'} "
            f"| {cpu} | {per or '-'}{total} |"
        )
    held = f.get("max_sustained_per_s")
    connect = f.get("connect") or {}
    lines = [
        "## Sustained load",
        "",
        f"{f['meters']:,} meters, each its own mutual-TLS connection from "
        f"{f['generators']} generator processes, publish at each offered rate for "
        f"{f['seconds_per_tier']:g} s to {f['workers']} worker(s); latency is publish -> "
        "receipt. Tiers marked (searched) were chosen halfway between the highest sustained",
        "rate and the lowest unsustained one above it; (half) is half the highest sustained",
        "rate, where the latency target is judged. CPU is cores busy per process group (1.0 =",
        "one core) while publishing; the last column divides it by the accepted rate.",
        _bridge_in_load(f),
        "",
        "| offered /s | published /s | accepted /s | latency p50 / p95 / p99 ms | sustained "
        "| CPU cores by group | CPU µs per accepted reading |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Highest sustained tier: {_n(held) + '/s' if held else 'none'}."
        + (
            f" Connect ramp: {connect['connected']:,} meters in {connect['seconds']} s "
            f"({_n(connect['handshakes_per_s'])} handshakes/s)."
            if connect
            else ""
        ),
        "",
        *_broker_calls(f["tiers"]),
        *_latency_legs(f["tiers"]),
        *_load_ceiling(data, found.get("ingest")),
    ]
    if any(t.get("latency_ms") for t in f["tiers"]):
        lines += ["![latency percentiles](img/bench-latency.png)", ""]
    return [*lines, _measured(data), ""]


def _held_while_reporting(f: Data) -> int:
    """Sessions held, counted only when ingest kept up with every meter reporting every
    5 s (or more often) for at least 2 minutes: what the connection targets ask; else 0."""
    asked = f["ingest_kept_up"] and f["interval_s"] <= 5 and f["seconds"] >= 120
    return int(f["held"]) if asked else 0


#: The process groups of a live run, in the order the report lists their cores.
_CORE_GROUPS: Final = ("broker", "postgres", "redis", "workers", "generator")


def _connections(data: Data, found: dict[str, Data]) -> list[str]:
    f = data["figures"]
    c, mem, key = f["connect"], f.get("broker_memory") or {}, f.get("broker_key") or {}
    cap = f.get("broker_limits") or {}
    rep = f["reporting"]
    lat = rep.get("latency_ms") or {}
    errors = ", ".join(f"{k} {v:,}" for k, v in (c.get("errors") or {}).items()) or "none"
    brokers = f.get("brokers", 1)
    gen_mem = f.get("generator_memory")
    where = (
        "connect to one broker"
        if brokers == 1
        else f"connect to {brokers} brokers on this machine, each meter to the one a hash of "
        "its id names (every worker subscribes on each)"
    )
    return [
        "## Concurrent connections"
        if brokers == 1
        else f"## Meters sharded over {brokers} brokers",
        "",
        f"`meterproof bench {data['suite']}`: {f['meters']:,} meters, each its own mutual-TLS "
        f"MQTT 5 session with its own device certificate, from {f['generators']} generator "
        f"processes, {where}; then each publishes a reading every {f['interval_s']:g} s for "
        f"{f['seconds']:g} s ({_n(f['offered_per_s'])} readings/s) to {f['workers']} worker(s).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| sessions held at the end | **{f['held']:,}** of {f['meters']:,} |",
        f"| connect ramp | {c['connected']:,} in {c['seconds']} s "
        f"({_n(c['handshakes_per_s'])} handshakes/s); errors: {errors} |",
        *(
            [f"| meters per broker | {' / '.join(f'{n:,}' for n in c['per_broker'])} |"]
            if brokers > 1 and "per_broker" in c
            else []
        ),
        *(
            [
                f"| generator memory | {gen_mem['rss_mib']:,.0f} MiB in all, "
                f"{gen_mem['per_meter_kib']:,.1f} KiB per meter |"
            ]
            if gen_mem
            else []
        ),
        *(
            [f"| broker CPU per handshake | {c['broker_cpu_ms_per_handshake']:.2f} ms |"]
            if c.get("broker_cpu_ms_per_handshake") is not None
            else []
        ),
        *(
            [f"| broker key ({key['type']}) signatures/s, one core | {_n(key['signs_per_s'])} |"]
            if key
            else []
        ),
        *(
            [
                f"| broker memory | {mem['rss_before_mib']:,.0f} -> {mem['rss_after_mib']:,.0f} "
                f"MiB ({mem['per_connection_kib']:,.1f} KiB per connection) |"
            ]
            if mem
            else []
        ),
        f"| broker caps | max_connections {cap.get('max_connections')}, open files "
        f"{cap.get('open_files')} |",
        f"| reporting: accepted | {_n(rep['accepted_per_s'])} readings/s |",
        *(
            [
                "| reporting: cores used (broker / PostgreSQL / Redis / workers / generators) | "
                + " / ".join(f"{cores.get(g, 0):.2f}" for g in _CORE_GROUPS)
                + f" of the machine's {rep['cpu']['machine_cores']:.2f} |"
            ]
            if (cores := (rep.get("cpu") or {}).get("cores"))
            else []
        ),
        "| reporting: publish -> receipt p50 / p95 / p99 | "
        + " / ".join(f"{lat[q]:,.0f}" if q in lat else "-" for q in ("p50", "p95", "p99"))
        + " ms |",
        f"| ingest kept up | {'yes' if f['ingest_kept_up'] else 'no'} |",
        "",
        _measured(data),
        "",
    ]


def _bridge(data: Data, found: dict[str, Data]) -> list[str]:
    f = data["figures"]
    return [
        "## Sealing, anchoring and verifying an epoch",
        "",
        f"One epoch of {f['readings']:,} readings from {f['meters']:,} meters, claimed while the",
        "epoch was open (as the bridge does), then sealed: final claim, RFC 6962 root, mints,",
        "signed entry; then appended to the local ledger; then `ledger verify` re-hashes every",
        "reading from its stored fields and re-checks root, chain, signature and mints.",
        "",
        "| step | seconds | target |",
        "|---|---|---|",
        f"| claims while the epoch was open ({f['claim_steps']} steps) | {f['claim_s']:.1f} | - |",
        f"| seal at the epoch's close | {f['seal_s']:.1f} | - |",
        f"| anchor (local sink) | {f['anchor_s']:.2f} | - |",
        f"| **seal + anchor** | **{f['seal_and_anchor_s']:.1f}** | < 10 |",
        f"| **ledger verify** | **{f['verify_s']:.1f}** | < 30 |",
        "",
        _measured(data),
        "",
    ]


def _load_before(run: Data) -> str:
    load = run.get("load_1m_before")
    return "?" if load is None else f"{load:.2f}"


def _compare(data: Data, found: dict[str, Data]) -> list[str]:
    f = data["figures"]
    head = [
        "## Before and after (same machine, alternating runs)",
        "",
        f"{f['label'] or 'A change'}: backlog drains of {f['readings']:,} readings with "
        f"{_workers(f['workers'])}, the baseline checkout and this one alternating round by",
        "round (`meterproof bench compare --baseline <checkout>`), each side running its own",
        "code from its own venv.",
        "",
        f"- baseline: {f['baseline']}",
        f"- current: {f['current']}",
        "",
        *_incomplete(f),
    ]
    if "means" not in f:  # no round finished
        return [*head, _measured(data), ""]
    rows = [
        f"| {i} | {b['drain_per_s']:,.0f} | {c['drain_per_s']:,.0f} "
        f"| {b['cpu_us_per_reading']:.1f} | {c['cpu_us_per_reading']:.1f} "
        f"| {_load_before(b)} / {_load_before(c)} |"
        for i, (b, c) in enumerate(zip(f["runs"]["baseline"], f["runs"]["current"], strict=True), 1)
    ]
    median, spread = f.get("median_round_ratio"), f.get("round_ratio_range")
    means, ratio = f["means"], f["ratio"]
    return [
        *head,
        "| round | baseline /s | current /s | baseline worker CPU µs / reading "
        "| current worker CPU µs / reading | load average before (baseline / current) |",
        "|---|---|---|---|---|---|",
        *rows,
        f"| **mean** | **{means['baseline']['drain_per_s']:,.0f}** "
        f"| **{means['current']['drain_per_s']:,.0f}** "
        f"| **{means['baseline']['cpu_us_per_reading']:.1f}** "
        f"| **{means['current']['cpu_us_per_reading']:.1f}** | |",
        "",
        f"Current / baseline, ratio of the means: drain rate {ratio['drain_per_s']:.3f}, worker "
        f"CPU per reading {ratio['cpu_us_per_reading']:.3f}"
        + (f", both drains counted {f['drain_counted']}." if "drain_counted" in f else ".")
        + (
            " The baseline's bench predates that accounting, so its start-up differs too"
            " (no probe server, no readiness polls): for a fair drain, give the baseline"
            " this checkout's `bench/`."
            if f.get("drain_counted") == OLDER_ACCOUNTING
            else ""
        )
        + (
            ""
            if median is None
            else f" Median of the rounds' ratios: {median['drain_per_s']:.3f} and "
            f"{median['cpu_us_per_reading']:.3f}."
        )
        + (
            ""
            if spread is None
            else f" The rounds' ratios ranged over {_range(spread['drain_per_s'])} and "
            f"{_range(spread['cpu_us_per_reading'])}."
        ),
        "",
        *_compare_live(f),
        _measured(data),
        "",
    ]


def _incomplete(f: Data) -> list[str]:
    """What stopped a compare before its last round, if something did."""
    stopped = f.get("incomplete")
    if not stopped:
        return []
    return [
        f"**Incomplete**: {stopped['rounds']} of {stopped['of']} rounds finished; the next "
        f"failed: {stopped['error']}",
        "",
    ]


def _range(low_high: list[float]) -> str:
    """The lowest and highest of the rounds' ratios."""
    low, high = low_high
    return f"{low:.3f}-{high:.3f}"


def _compare_live(f: Data) -> list[str]:
    """The live tiers of `bench compare --live`, if it ran them."""
    live = f.get("live")
    if not live:
        return []
    groups = ("workers", "postgres", "broker", "redis")

    def side(m: Data) -> str:
        return (
            f"{m['server_us_per_reading']:,.0f} ("
            + ", ".join(f"{g} {m['us_per_reading'][g]:,.0f}" for g in groups)
            + ")"
        )

    rounds = len(f["runs"]["baseline"])

    def row(r: Data) -> str:
        m = r.get("means")
        held = r.get("sustained")
        if held is None:  # results from before rounds were left out: in each side's means
            held = {k: r["means"][k]["sustained"] for k in ("baseline", "current")}
        cells = (
            "- | - | none: no round sustained on both sides | -"
            if m is None
            else f"{side(m['baseline'])} | {side(m['current'])} | {r['ratio']:.3f} "
            f"| {r['median_round_ratio']:.3f}"
            + ("" if "round_ratio_range" not in r else f" ({_range(r['round_ratio_range'])})")
        )
        left = r.get("rounds_left_out")
        return (
            f"| {r['offered_per_s']:,} | {cells} | {held['baseline']} / {held['current']} of "
            f"{rounds} | {'- (every round averaged)' if left is None else left} |"
        )

    rows = [row(r) for r in live["per_rate"]]
    return [
        f"Live, in the same rounds (`--live`): each side's `bench load` at each offered rate "
        f"({live['seconds']:g} s, {live['meters']:,} meters), server CPU per accepted reading in "
        "µs (workers, PostgreSQL, broker, Redis; the load generator excluded), mean of the "
        "rounds both sides sustained (an overloaded tier's cost per reading is its backlog's);",
        "the others are left out.",
        "",
        "| offered /s | baseline µs (by group) | current µs (by group) | current / baseline "
        "| median (range) of the rounds' ratios | rounds sustained (baseline / current) "
        "| rounds left out |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _consent(data: Data, found: dict[str, Data]) -> list[str]:
    f = data["figures"]
    runs = f["runs"]
    base = runs["none"]
    rows = {
        "none": "no integrators, no consents",
        "policy": f"{f['integrators']:,} integrators, {f['consents']:,} consents (other meters)",
        "delivering": "the same, plus one live consent per drained meter",
    }
    return [
        "## The drain with the consent policy in place",
        "",
        f"`meterproof bench consent`: three drains of {base['readings']:,} readings with 2"
        f" workers, in turn, {f.get('rounds', 1)} round(s) in one run, the best round of each"
        " kept. Each worker holds the consent view and asks"
        " `may_see` for every stored reading; with a consent, the reading is also published to"
        " that integrator's feed.",
        "",
        "| consents | readings/s | vs none | worker CPU µs/reading |",
        "|---|---|---|---|",
        *(
            f"| {label} | {runs[k]['drain_per_s']:,.0f} |"
            f" {runs[k]['drain_per_s'] / base['drain_per_s']:.1%} |"
            f" {runs[k]['cpu_us_per_reading']:.0f} |"
            for k, label in rows.items()
        ),
        *_consent_live(f, rows),
        "",
        _measured(data),
        "",
    ]


def _consent_live(f: Data, rows: dict[str, str]) -> list[str]:
    live = f.get("live")
    if not live:
        return []
    base = live["none"]
    return [
        "",
        "Live, from connected meters at a fixed offered rate (each case's best round): server"
        " CPU per accepted reading (workers, PostgreSQL, broker, Redis; the load generator"
        " excluded) and publish -> receipt p99.",
        "",
        "| consents | accepted/s | server CPU µs/reading | vs none | of which workers | vs none |"
        " p99 ms |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {label} | {live[k]['accepted_per_s']:,.0f} | {live[k]['server_us']:.0f} |"
            f" {live[k]['server_us'] / base['server_us']:.1%} |"
            f" {live[k].get('workers_us', 0):.0f} |"
            f" {live[k].get('workers_us', 0) / max(base.get('workers_us', 0), 1):.1%} |"
            f" {live[k]['p99_ms']:.1f} |"
            for k, label in rows.items()
        ),
    ]


def _chain(data: Data, found: dict[str, Data]) -> list[str]:
    f = data["figures"]
    d, lat = f["direct"], f["latency"]
    blocks = f["block_gas_limit"]
    rows = [
        f"| {t['meters']:,} | {t['anchor_gas']:,} | {t['anchor_s']:.2f} | {t['tree_build_s']:.2f}"
        f" | {t['proof_hashes']} | {t['claim_gas_mean']:,.0f} ({t['claim_gas_min']:,}"
        f"-{t['claim_gas_max']:,}, {t['claims_sampled']} claims) | {t['claim_s_mean']:.3f}"
        f" | {t['claims_gas_per_epoch_extrapolated']:,.0f} |"
        f" {t['direct_gas_per_epoch_extrapolated']:,.0f} ({t['direct_blocks_needed']:,} blocks) |"
        for t in f["trees"]
    ]
    direct = ", ".join(f"{m['wallets']} wallets {m['gas']:,} gas" for m in d["measured"])
    return [
        "## GRID on an EVM chain (ganache)",
        "",
        "Per epoch, on a ganache 7.9 dev node (`meterproof bench chain`). Measured: the",
        "anchoring transaction with a claim tree over every meter (the tree built in Python",
        "over all n leaves), and real claims sampled from each tree, to fresh wallets, from",
        "the start of a claimed-bitmap word. Extrapolated: per-epoch claim gas (n x the",
        "sampled mean) and direct minting of n wallets (base + n x the measured gas per",
        f"wallet; blocks of {blocks:,} gas). Direct anchors measured: {direct}; so",
        f"{d['per_wallet_gas']:,.0f} gas per wallet over a base of {d['base_gas']:,.0f}.",
        "",
        "| meters | anchor gas (oracle) | anchor s | tree build s | proof hashes "
        "| gas per claim, mean (range) | s per claim | claims gas per epoch (extrapolated) "
        "| direct minting gas per epoch (extrapolated) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Anchor latency, epoch close to {lat['confirmations']} confirmations, through "
        f"`BatchStore` and the `evm` sink on {lat['block_time_s']:g}-second blocks: "
        f"**{lat['close_to_confirmed_s']:.2f} s** for {lat['meters']:,} meters "
        f"({lat['readings']:,} readings; seal {lat['seal_s']:.2f} s of it).",
        "",
        _measured(data),
        "",
    ]


def _api(data: Data, found: dict[str, Data]) -> list[str]:
    f = data["figures"]
    load, batch, drain, r = f["load"], f["batch"], f["drain"], f["reads"]

    def row(name: str, what: str, target: str) -> str:
        m = r[name]
        first = f"{m['first_ms']:.1f}" if "first_ms" in m else "-"
        return (f"| {what} | {m['n']} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} "
                f"| {m['max_ms']:.1f} | {first} | {target} |")  # fmt: skip

    return [
        "## The HTTP API",
        "",
        f"`meterproof bench api`: {f['stored']:,} readings stored ({load['meters']} meters, one "
        f"reading every 5 s for {load['days']} days, loaded straight into PostgreSQL in "
        f"{load['load_s']:.0f} s, {_n(load['per_s'])} readings/s, with reading_log and the",
        "15-minute rollups; then the day submitted below). The real `meterproof api` process "
        f"over HTTPS, one client on the same machine ({f.get('client', 'httpx')}), an "
        "operator's token; each time runs from",
        "the request to the body's last byte. The day of history is the day just submitted,",
        "17,280 readings in one page (`limit=20000`; no cursor needed), checked complete.",
        *_pages(f.get("pages")),
        "",
        "| read | n | p50 ms | p99 ms | max ms | first read ms | target |",
        "|---|---|---|---|---|---|---|",
        row("latest", "latest", "p99 < 10 ms"),
        row("history_json", f"a meter-day of history, JSON ({r['history_json']['bytes']:,} "
            "bytes)", "p99 < 50 ms"),
        row("history_csv", f"a meter-day of history, CSV ({r['history_csv']['bytes']:,} bytes)",
            "-"),
        *(
            row(f"rollups_{w}", f"{r[f'rollups_{w}']['days']} days of {name} rollups "
                f"({r[f'rollups_{w}']['intervals']:,})", "< 50 ms")
            for w, name in (("15m", "15-minute"), ("1h", "hourly"), ("1d", "daily"))
        ),
        "",
        f"Batch submission (`/api/meters/energy/batch`, {batch['clients']} meters at once, each "
        f"posting batches of {batch['batch']:,} and waiting for the receipts, which come after "
        f"the commit): **{_n(batch['per_s'])} readings/s** ({batch['readings']:,} readings in "
        f"{batch['seconds']:.1f} s; {batch.get('retries_503', 0)} batch(es) posted again after a "
        f"503 `commit_timeout`, slowest answer {batch.get('slowest_answer_s', 0):.1f} s). "
        "The MQTT backlog drain of the same run "
        f"({drain['readings']:,} readings, {_workers(drain['workers'])}): "
        f"**{_n(drain['drain_per_s'])} readings/s**, so the API takes "
        f"{batch['per_s'] / drain['drain_per_s']:.0%} of the drain's rate (the API process "
        "runs one ingest worker in-process).",
        "",
        *_load_average(f, data["machine"]["cores"]),
        _measured(data),
        "",
    ]  # fmt: skip


def _pages(pages: Data | None) -> list[str]:
    """How long the API's renderer took to turn the stored quarters into history pages."""
    if pages is None:
        return []
    loaded, submitted = pages["loaded"], pages["submitted"]
    return [
        "History reads of a whole range (JSON and CSV) join the history pages the API renders",
        f"from closed quarters (api/pages.py): the loaded history's {loaded['quarters']:,} "
        f"quarters took it {loaded['seconds']:.0f} s after its start, the submitted day's "
        f"{submitted['quarters']:,} {submitted['seconds']:.0f} s after the submissions (up to "
        "one pause between its passes included).",
    ]


def _load_average(f: Data, cores: str) -> list[str]:
    """The machine's 1-minute load average around the run: other work shares its cores."""
    avg = f.get("load_avg_1m")
    if avg is None:
        return []
    return [
        f"1-minute load average of the machine ({cores} cores, shared with other work): "
        f"{avg['before']:.1f} before the run, {avg['after']:.1f} after it.",
        "",
    ]


SECTIONS: Final[dict[str, Callable[[Data, dict[str, Data]], list[str]]]] = {
    "limits": _limits,
    "ingest": _ingest,
    "registration": _registration,
    "load": _load,
    "connections": _connections,
    "shards": _connections,
    "bridge": _bridge,
    "consent": _consent,
    "compare": _compare,
    "chain": _chain,
    "api": _api,
}

_VERSIONS: Final = (
    ("Python", "python"), ("Mosquitto", "mosquitto"), ("PostgreSQL", "postgresql"),
    ("Redis", "redis"), ("gmqtt", "gmqtt"), ("uvloop (load generator)", "uvloop"),
    ("PyNaCl (signing)", "pynacl"), ("solders (Ed25519 checks)", "solders"),
    ("psycopg", "psycopg"), ("redis-py", "redis-py"),
    ("cryptography", "cryptography"), ("meterproof", "meterproof"),
)  # fmt: skip


def _machine(found: dict[str, Data]) -> list[str]:
    newest = max(found.values(), key=lambda d: d["machine"]["date"])
    m = newest["machine"]
    others = sorted(
        {f"{d['machine']['cpu']}, {d['machine']['cores']} cores" for d in found.values()}
        - {f"{m['cpu']}, {m['cores']} cores"}
    )
    runs = [f"{suite} ({data['machine']['date']})" for suite, data in found.items()]
    lines = [
        "## Machine and versions",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu']}, {m['cores']} cores |",
        f"| memory | {m['memory']} |",
        f"| OS | {m['os']} |",
        *(f"| {name} | {m[key]} |" for name, key in _VERSIONS if key in m),
        f"| suites run | {', '.join(runs)} |",
        "",
    ]
    if others:
        lines += [f"Some suites ran on other machines: {'; '.join(others)}.", ""]
    return lines


def render(results: Path = RESULTS, report: Path = REPORT) -> Path:
    found = {s: d for s in SUITES if (d := latest(s, results)) is not None}
    lines = [
        "# Benchmarks",
        "",
        "Produced by `make bench` (`meterproof bench`, `--quick` for a short run); raw JSON in",
        "`bench/results/`. Every figure below was measured by that command on the machine",
        "listed; the figures of the issue's alternatives are quoted and marked as such.",
        "Everything runs on loopback on one machine: clients, broker, workers and databases",
        "share its cores.",
        "",
    ]
    if found:
        lines += _machine(found)
        lines += _targets_section(found)
    for suite, section in SECTIONS.items():
        if suite in found:
            lines += section(found[suite], found)
            if suite == "limits":
                lines += _peers(found)
    ingest, load = found.get("ingest"), found.get("load")
    runs = [] if ingest is None else ingest["figures"]["runs"]
    tiers = [] if load is None else load["figures"]["tiers"]
    images = report.parent / "img"
    plots.throughput_over_time(runs, images)
    plots.latency_percentiles(tiers, images)
    plots.scaling(runs, tiers, images)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))
    return report
