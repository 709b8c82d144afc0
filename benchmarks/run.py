"""The sidecar's performance goals, measured side by side in one run, as one table.

Starts everything itself on 127.0.0.1 (a minimal upstream, sidecars, a throwaway
PostgreSQL), runs each load for a bounded time, and prints one row per goal: what
was measured, the ratio a goal is judged by, the target, and ``pass`` or
``short`` (``info`` where there is no target). Absolute figures on a shared
2-core machine are noisy: what is compared is measured side by side in the same
run. Run:

    ./scripts/bench [--seconds 4] [--connections 16] [--only 1,sustained,...]
    .venv/bin/python -m benchmarks [same options]

Goals (by number or name for ``--only``; 3 and 4, and the forward CPU and boto3
goals that were 1 and 2, are retired):

  1 quota      AWS's full quota, 10 MeterUsage + 10 BatchMeterUsage a second for
               ``--quota-seconds`` (30) through the sidecar, beside the same calls
               straight to the upstream: the sidecar's CPU and its added p50 and p99
  2 sustained  100 MeterUsage a second for ``--sustain-seconds`` (20), no errors
  5 intake     1,000-record ``POST /v1/usage-records`` records/s vs raw fsync'd SQLite
  6 single     1-record calls/s vs the sidecar's own ``GET /healthz``
  7 postgres   PostgreSQL store intake, 1 and 1,000 records per call, beside SQLite
  8 footprint  idle RSS (aws mode and the sandbox, on SQLite), RSS after load, start
               to ``/readyz`` 200
  9 fleet      a slot of the fleet's request quota in the shared store (one statement
               per send): wall and client CPU per slot, three replicas at once, beside
               the in-process bucket
 10 group      group commit on the shared store (benchmarks/group_commit.py): 1-record
               calls/s on PostgreSQL beside SQLite, and one hot grain from three
               replicas x ``--connections`` connections
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.fleet_quota import REPLICAS
from benchmarks.fleet_quota import measure as fleet_slot_cost
from benchmarks.footprint import AWS, DEFAULT_MODES, Startup, footprints
from benchmarks.forward import (
    BATCH_RECORDS,
    cpu_seconds,
    rss_mb,
    sidecar_env,
    sidecar_targets,
    upstream_targets,
)
from benchmarks.group_commit import HOT_GOAL, SINGLE_GOAL
from benchmarks.group_commit import measure as group_commit
from benchmarks.ingest import intake_env, intake_load, plain_sqlite
from benchmarks.load import LoadResult, load, wrk_available
from benchmarks.paced import Latencies, paced_streams
from benchmarks.rawhttp import Target
from benchmarks.upstream import run_upstream
from tests.pg import PgServer, PgServerError, find_bindir
from tests.sidecar import run_sidecar

GOALS = {
    1: "quota",
    2: "sustained",
    5: "intake",
    6: "single",
    7: "postgres",
    8: "footprint",
    9: "fleet",
    10: "group",
}
# AWS's request quota per account and region, for each of MeterUsage and BatchMeterUsage.
QUOTA_RATE = 10.0
SUSTAINED_RATE = 100.0
# Paced requests per stream before the measured run, at the measured rate.
WARM_UP_SECONDS = 1
BATCH = 1000
# Connections for the 1,000-record calls (each takes a large part of a second).
BATCH_CONNECTIONS = 4


@dataclass
class Row:
    """One line of the table."""

    goal: str
    measured: str
    ratio: str
    target: str
    verdict: str


def _verdict(ok: bool) -> str:
    return "pass" if ok else "short"


def _fmt_rate(rate: float) -> str:
    return f"{rate:,.0f}"


def _ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0 (a load that completed nothing)."""
    return a / b if b else math.nan


def _errors(result: LoadResult) -> str:
    return f", {result.errors} errors" if result.errors else ""


def _good_rate(result: LoadResult, per_call: int = 1) -> float:
    """Records (or calls) per second answered without error."""
    if not result.seconds:
        return 0.0
    return max(0, result.requests - result.errors) * per_call / result.seconds


@dataclass
class Run:
    """The options, the rows so far, and the RSS of each sidecar after its load."""

    seconds: int
    connections: int
    goals: set[int]
    quota_seconds: int = 30
    sustain_seconds: int = 20
    rows: list[Row] = field(default_factory=list)
    loaded_rss: dict[str, float] = field(default_factory=dict)
    timings: list[tuple[str, float]] = field(default_factory=list)

    def add(
        self, goal: int, suffix: str, measured: str, ratio: str, target: str, verdict: str
    ) -> None:
        """Add a row for ``goal`` (named ``N<suffix> name``)."""
        name = f"{goal}{suffix} {GOALS[goal]}"
        self.rows.append(Row(name, measured, ratio, target, verdict))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase and say on stderr what is running."""
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings.append((name, time.monotonic() - started))


@dataclass(frozen=True)
class Paced:
    """A paced run's latencies by stream, and the sidecar's CPU share of one core."""

    latencies: dict[str, Latencies]
    cpu_share: float
    seconds: float


def _paced_on(pid: int, streams: Mapping[str, Target], rate: float, seconds: float) -> Paced:
    """Warm up, then run ``streams`` at ``rate`` each for ``seconds``, reading the
    CPU of process ``pid`` over the measured part only."""
    paced_streams(streams, rate=rate, seconds=WARM_UP_SECONDS, warm_up=0)
    cpu_before = cpu_seconds(pid)
    started = time.monotonic()
    latencies = paced_streams(streams, rate=rate, seconds=seconds, warm_up=0)
    wall = time.monotonic() - started
    return Paced(latencies, (cpu_seconds(pid) - cpu_before) / wall, wall)


def _quota_phase(run: Run, upstream_url: str) -> None:
    # The sidecar as deployed (AWS's quotas kept, access log on), beside the same
    # calls straight to the upstream, all four streams at once.
    with run_sidecar(sidecar_env(upstream_url), wait_ready=True) as sidecar:
        streams = {f"sidecar {k}": t for k, t in sidecar_targets(sidecar.url).items()}
        streams |= {f"upstream {k}": t for k, t in upstream_targets(upstream_url).items()}
        paced = _paced_on(sidecar.process.pid, streams, QUOTA_RATE, run.quota_seconds)
        run.loaded_rss["quota"] = rss_mb(sidecar.process.pid)
    side = Latencies.merged(*(v for k, v in paced.latencies.items() if k.startswith("sidecar")))
    up = Latencies.merged(*(v for k, v in paced.latencies.items() if k.startswith("upstream")))
    errors = side.errors + up.errors
    noted = f", {errors} errors" if errors else ""
    share = paced.cpu_share * 100
    run.add(
        1,
        "a",
        f"sidecar CPU {share:.1f}% of a core at {QUOTA_RATE:g} MeterUsage + {QUOTA_RATE:g} "
        f"BatchMeterUsage ({BATCH_RECORDS} records) req/s for {paced.seconds:.0f} s "
        f"({len(side.samples)} calls{noted})",
        "-",
        "<= 5%",
        _verdict(share <= 5 and not errors),
    )
    for suffix, q, limit in (("b", 0.5, 2.0), ("c", 0.99, 5.0)):
        added = side.percentile(q) - up.percentile(q)
        label = "p50" if q == 0.5 else "p99"
        run.add(
            1,
            suffix,
            f"+{added:.2f} ms {label} (sidecar {side.percentile(q):.2f}, upstream "
            f"{up.percentile(q):.2f} ms; {len(side.samples)} calls each{noted})",
            "-",
            f"<= {limit:g} ms",
            _verdict(added <= limit and not errors),
        )


def _sustained_phase(run: Run, upstream_url: str) -> None:
    # No MeterUsage quota here: the limiter would hold the load at 10 a second.
    env = {**sidecar_env(upstream_url), "METERING_QUOTA_METER_USAGE": "0"}
    with run_sidecar(env, wait_ready=True) as sidecar:
        streams = {"meter": sidecar_targets(sidecar.url)["meter"]}
        paced = _paced_on(sidecar.process.pid, streams, SUSTAINED_RATE, run.sustain_seconds)
        run.loaded_rss["sustained"] = rss_mb(sidecar.process.pid)
    figures = paced.latencies["meter"]
    expected = round(SUSTAINED_RATE * run.sustain_seconds)
    answered = len(figures.samples)
    run.add(
        2,
        "",
        f"{answered:,} calls at {SUSTAINED_RATE:g} req/s in {paced.seconds:.1f} s: "
        f"{figures.errors} errors, {figures.late} late; p50 {figures.percentile(0.5):.2f}, "
        f"p99 {figures.percentile(0.99):.2f} ms; CPU {paced.cpu_share * 100:.0f}% of a core",
        "-",
        "0 errors",
        _verdict(figures.errors == 0 and answered == expected),
    )


def _intake_sidecar(
    run: Run, store: str, store_env: dict[str, str], *, healthz: bool
) -> tuple[LoadResult, LoadResult, LoadResult | None]:
    """(1-record, 1,000-record, healthz or None) loads on a sidecar with this store."""
    seconds, connections = run.seconds, run.connections
    with run_sidecar(intake_env(store_env), wait_ready=True) as sidecar:
        intake_load(sidecar.url, seconds=WARM_UP_SECONDS, connections=connections, batch=1)
        health = (
            load(f"{sidecar.url}/healthz", seconds=seconds, connections=connections, method="GET")
            if healthz
            else None
        )
        single = intake_load(sidecar.url, seconds=seconds, connections=connections, batch=1)
        batched = intake_load(
            sidecar.url, seconds=seconds, connections=BATCH_CONNECTIONS, batch=BATCH
        )
        run.loaded_rss[store] = rss_mb(sidecar.process.pid)
    return single, batched, health


def _intake_phase(run: Run) -> tuple[LoadResult, LoadResult]:
    with tempfile.TemporaryDirectory(prefix="bench-intake-") as tmp:
        single, batched, health = _intake_sidecar(
            run,
            "sqlite",
            {"METERING_QUEUE_PATH": str(Path(tmp) / "queue.sqlite3")},
            healthz=6 in run.goals,
        )
        if 5 in run.goals:
            raw = plain_sqlite(Path(tmp) / "plain.sqlite3", run.seconds, BATCH)
            rate = _good_rate(batched, BATCH)
            run.add(
                5,
                "",
                f"sidecar {_fmt_rate(rate)} rec/s vs raw sqlite3 {_fmt_rate(raw)} rec/s"
                f"{_errors(batched)}",
                f"{_ratio(rate, raw):.2f}",
                ">= 0.25",
                _verdict(_ratio(rate, raw) >= 0.25 and not batched.errors),
            )
    if health is not None:
        ratio = _ratio(_good_rate(single), _good_rate(health))
        run.add(
            6,
            "",
            f"{_fmt_rate(_good_rate(single))} calls/s vs /healthz "
            f"{_fmt_rate(_good_rate(health))}/s{_errors(single)}",
            f"{ratio:.2f}",
            ">= 0.5",
            _verdict(ratio >= 0.5 and not single.errors and not health.errors),
        )
    return single, batched


def _postgres_phase(run: Run, sqlite: tuple[LoadResult, LoadResult] | None) -> None:
    if _without_postgres(run, 7):
        return
    with PgServer() as server:
        dsn = server.create_database("bench")
        single, batched, _ = _intake_sidecar(
            run, "postgresql", {"METERING_QUEUE_DSN": dsn}, healthz=False
        )
    for suffix, per_call, result, index in (("a", 1, single, 0), ("b", BATCH, batched, 1)):
        rate = _good_rate(result, per_call)
        beside = ""
        ratio = "-"
        if sqlite is not None:
            lite = _good_rate(sqlite[index], per_call)
            beside = f" vs SQLite {_fmt_rate(lite)} rec/s"
            ratio = f"{_ratio(rate, lite):.2f}"
        run.add(
            7,
            suffix,
            f"{per_call:,}/call: PostgreSQL {_fmt_rate(rate)} rec/s{beside}{_errors(result)}",
            ratio,
            "- (PG/SQLite)",
            "info",
        )


def _without_postgres(run: Run, goal: int) -> bool:
    """Whether PostgreSQL's programs are missing (then the goal's row says so)."""
    try:
        find_bindir()
    except PgServerError as exc:
        run.add(goal, "", f"not run: {exc}", "-", "-", "info")
        return True
    return False


def _fleet_phase(run: Run) -> None:
    if _without_postgres(run, 9):
        return
    cost = fleet_slot_cost()
    run.add(
        9,
        "",
        f"one slot {cost.p50_us:,.0f} us p50 ({cost.p99_us:,.0f} p99) wall, "
        f"{cost.cpu_us:,.0f} us client CPU; {REPLICAS} replicas at once "
        f"{cost.contended_per_second:,.0f} slots/s; in-process bucket "
        f"{cost.in_process_us:.2f} us",
        "-",
        "<= 2 ms p50",
        _verdict(cost.p50_us <= 2000),
    )


def _group_phase(run: Run) -> None:
    if _without_postgres(run, 10):
        return
    result = group_commit(run.seconds, run.connections)
    lite, pg, hot = result.sqlite, result.postgres, result.hot_grain
    run.add(
        10,
        "a",
        f"1-record calls/s, {run.connections} connections: PostgreSQL "
        f"{pg.calls_per_second:,.0f} ({pg.calls_per_commit:.1f} calls/commit) vs SQLite "
        f"{lite.calls_per_second:,.0f}{_errors_of(pg.errors + lite.errors)}",
        f"{result.ratio:.2f}x",
        f">= {SINGLE_GOAL}x",
        _verdict(result.ratio >= SINGLE_GOAL and not pg.errors),
    )
    run.add(
        10,
        "b",
        f"one grain, {REPLICAS} replicas x {run.connections} connections: "
        f"{hot.calls_per_second:,.0f} calls/s together ({hot.calls_per_commit:.1f} "
        f"calls/commit){_errors_of(hot.errors)}",
        "-",
        f">= {HOT_GOAL:,.0f} calls/s",
        _verdict(hot.calls_per_second >= HOT_GOAL and not hot.errors),
    )


def _errors_of(count: int) -> str:
    return f", {count} errors" if count else ""


def _footprint_rows(run: Run, startups: Mapping[str, Startup]) -> None:
    """Rows a (the larger idle RSS of the default modes, each mode's beside it), b (the
    largest RSS after a load) and c (aws mode's start to ready)."""
    which = max(DEFAULT_MODES, key=lambda mode: startups[mode].idle_rss_mb)
    idle_rss = startups[which].idle_rss_mb
    others = "; ".join(
        f"{mode} {startup.idle_rss_mb:.1f}" for mode, startup in startups.items() if mode != which
    )
    run.add(
        8,
        "a",
        f"{idle_rss:.1f} MB idle RSS after start ({which} mode, median of 3; {others} MB)",
        "-",
        "<= 60 MB",
        _verdict(idle_rss <= 60),
    )
    if run.loaded_rss:
        which, rss = max(run.loaded_rss.items(), key=lambda item: item[1])
        others = ", ".join(f"{k} {v:.0f}" for k, v in run.loaded_rss.items() if k != which)
        run.add(
            8,
            "b",
            f"{rss:.1f} MB after load ({which} sidecar{f'; {others} MB' if others else ''})",
            "-",
            "<= 90 MB",
            _verdict(rss <= 90),
        )
    startup_seconds = startups[AWS].ready_seconds
    run.add(
        8,
        "c",
        f"{startup_seconds:.2f} s start to /readyz 200 ({AWS} mode, median of 3)",
        "-",
        "<= 1.5 s",
        _verdict(startup_seconds <= 1.5),
    )


def measure(
    seconds: int,
    connections: int,
    goals: set[int],
    *,
    quota_seconds: int = 30,
    sustain_seconds: int = 20,
) -> Run:
    """Run the phases the chosen goals need; return the rows."""
    run = Run(seconds, connections, goals, quota_seconds, sustain_seconds)
    sqlite: tuple[LoadResult, LoadResult] | None = None
    startup: dict[str, Startup] | None = None
    with run_upstream() as (upstream_url, _):
        if 8 in goals:
            with run.phase("footprint: three fresh starts of each mode"):
                startup = footprints(upstream_url)
        if 1 in goals:
            with run.phase(f"quota: {quota_seconds} s at AWS's quota, sidecar beside upstream"):
                _quota_phase(run, upstream_url)
        if goals & {2, 8}:
            with run.phase(f"sustained: {sustain_seconds} s at 100 req/s"):
                _sustained_phase(run, upstream_url)
    if goals & {5, 6, 7}:
        with run.phase("sqlite: intake on the SQLite store"):
            sqlite = _intake_phase(run)
    if 7 in goals:
        with run.phase("postgres: intake on the PostgreSQL store"):
            _postgres_phase(run, sqlite)
    if 9 in goals:
        with run.phase("fleet: slots of the fleet's request quota in PostgreSQL"):
            _fleet_phase(run)
    if 10 in goals:
        with run.phase("group: group commit on PostgreSQL, one hot grain"):
            _group_phase(run)
    if startup is not None:
        _footprint_rows(run, startup)
    return run


def format_table(rows: list[Row]) -> str:
    """A Markdown table of ``rows`` (readable as plain text too)."""
    header = Row("goal", "measured", "ratio", "target", "pass/short")
    cells = [header, *rows]
    widths = [
        max(len(getattr(row, name)) for row in cells)
        for name in ("goal", "measured", "ratio", "target", "verdict")
    ]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    out = [line([header.goal, header.measured, header.ratio, header.target, header.verdict])]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += [line([r.goal, r.measured, r.ratio, r.target, r.verdict]) for r in rows]
    return "\n".join(out)


def parse_goals(text: str | None) -> set[int]:
    """``--only``: comma-separated goal numbers or names; all goals when empty."""
    if not text:
        return set(GOALS)
    by_name = {name: number for number, name in GOALS.items()}
    chosen: set[int] = set()
    for item in (part.strip().lower() for part in text.split(",") if part.strip()):
        if item.isdigit() and int(item) in GOALS:
            chosen.add(int(item))
        elif item in by_name:
            chosen.add(by_name[item])
        else:
            names = ", ".join(f"{n} {name}" for n, name in GOALS.items())
            raise SystemExit(f"bench: unknown goal {item!r}; goals: {names}")
    return chosen


def _machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    load1 = os.getloadavg()[0]
    return f"{os.cpu_count()} CPUs, {model}, load average {load1:.2f} at the end"


def main(argv: list[str] | None = None) -> None:
    """Parse the options, measure, print the table."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument(
        "--seconds", type=int, default=4, help="seconds per intake load (default 4)"
    )
    parser.add_argument(
        "--quota-seconds",
        type=int,
        default=30,
        help="seconds at AWS's quota, goal 1 (default 30)",
    )
    parser.add_argument(
        "--sustain-seconds",
        type=int,
        default=20,
        help="seconds at 100 req/s, goal 2 (default 20)",
    )
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument(
        "--only",
        metavar="GOALS",
        help="comma-separated goal numbers or names: "
        + ", ".join(f"{n} {name}" for n, name in GOALS.items()),
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const="forward",
        choices=("forward", "intake"),
        help="instead of the goals: profile a path under wrk load with py-spy (forward: "
        "MeterUsage to the bench upstream, the default; intake: single-record "
        "POST /v1/usage-records on SQLite)",
    )
    args = parser.parse_args(argv)
    if min(args.seconds, args.quota_seconds, args.sustain_seconds) < 1:
        parser.error("--seconds, --quota-seconds and --sustain-seconds must be at least 1")
    if args.profile:
        from benchmarks.profile import main as profile_main

        profile_main(["--target", args.profile, "--seconds", str(max(args.seconds, 5))])
        return
    goals = parse_goals(args.only)
    if not wrk_available():
        print("bench: wrk not found, using the slower httpx load loop", file=sys.stderr)
    started = time.monotonic()
    run = measure(
        args.seconds,
        args.connections,
        goals,
        quota_seconds=args.quota_seconds,
        sustain_seconds=args.sustain_seconds,
    )
    elapsed = time.monotonic() - started
    print(format_table(run.rows))
    phases = ", ".join(f"{name.split(':')[0]} {sec:.0f} s" for name, sec in run.timings)
    print(
        f"\n{args.quota_seconds} s at the quota, {args.sustain_seconds} s sustained, "
        f"{args.seconds} s per intake load, {args.connections} connections, "
        f"{'wrk' if wrk_available() else 'httpx'}; {_machine()}; "
        f"{elapsed:.0f} s in all ({phases})"
    )
    judged = [row for row in run.rows if row.verdict in ("pass", "short")]
    short = sum(row.verdict == "short" for row in judged)
    print(f"bench: {short} of {len(judged)} rows with a target short of it", file=sys.stderr)


if __name__ == "__main__":
    main()
