"""Single-record intake on the shared PostgreSQL store, beside SQLite, and a hot grain.

The shared store gathers the intake calls that wait while a transaction runs into
the next one (group commit, ``app.queue.postgres``), as the SQLite store does with
its writer. This measures, in one run, on 127.0.0.1 (a throwaway PostgreSQL, sandbox
sidecars that send nothing while measured):

- ``single``: 1-record ``POST /v1/usage-records`` calls/s from ``--connections``
  connections to one sidecar on SQLite, then to one on PostgreSQL; the ratio
  PG/SQLite (goal >= 0.5) and the calls per commit of each;
- ``hot grain``: three replicas on one PostgreSQL database, ``--connections``
  connections each, every call one record for the same customer, dimension and hour
  (the benchmark's 1-record body): calls/s of the three together (goal >= 1,000), and
  calls per commit.

Absolute figures on a shared 2-core machine are noisy (the load generator, three
sidecars and the server share the cores); what is compared is measured side by side.
Run:

    .venv/bin/python -m benchmarks.group_commit [--seconds 4] [--connections 16]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from benchmarks.ingest import intake_env, intake_load
from benchmarks.load import LoadResult
from tests.pg import PgServer
from tests.sidecar import Sidecar, run_sidecar

REPLICAS = 3
SINGLE_GOAL = 0.5
HOT_GOAL = 1000.0
_COMMITS = re.compile(r"^metering_queue_commits (\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class Rate:
    """A load's good calls per second, errors, and calls per commit of the store."""

    calls_per_second: float
    errors: int
    calls_per_commit: float


@dataclass(frozen=True)
class GroupCommit:
    """What was measured."""

    sqlite: Rate
    postgres: Rate
    hot_grain: Rate

    @property
    def ratio(self) -> float:
        """PostgreSQL's single-record calls/s over SQLite's."""
        lite = self.sqlite.calls_per_second
        return self.postgres.calls_per_second / lite if lite else 0.0


def _commits(sidecar: Sidecar) -> float:
    match = _COMMITS.search(sidecar.client.get("/metrics").text)
    assert match is not None
    return float(match.group(1))


def _rate(results: list[LoadResult], commits: float) -> Rate:
    good = sum(max(0, r.requests - r.errors) for r in results)
    seconds = max(r.seconds for r in results)
    return Rate(
        calls_per_second=good / seconds if seconds else 0.0,
        errors=sum(r.errors for r in results),
        calls_per_commit=good / commits if commits else 0.0,
    )


def _loads(replicas: list[Sidecar], seconds: int, connections: int) -> Rate:
    """Single-record calls to every replica at once, ``connections`` connections each."""
    for replica in replicas:
        intake_load(replica.url, seconds=1, connections=connections, batch=1)  # warm-up
    before = sum(_commits(r) for r in replicas)
    results: list[LoadResult | None] = [None] * len(replicas)

    def load(index: int) -> None:
        results[index] = intake_load(
            replicas[index].url, seconds=seconds, connections=connections, batch=1
        )

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(replicas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = [r for r in results if r is not None]
    assert len(done) == len(replicas), "a load did not finish"
    return _rate(done, sum(_commits(r) for r in replicas) - before)


def measure(seconds: int = 4, connections: int = 16) -> GroupCommit:
    """Start what is needed, measure, stop it all."""
    with tempfile.TemporaryDirectory(prefix="bench-group-") as tmp, PgServer() as server:
        lite_env = intake_env({"METERING_QUEUE_PATH": str(Path(tmp) / "queue.sqlite3")})
        with run_sidecar(lite_env, wait_ready=True) as sidecar:
            sqlite = _loads([sidecar], seconds, connections)
        single_env = intake_env({"METERING_QUEUE_DSN": server.create_database("single")})
        with run_sidecar(single_env, wait_ready=True) as sidecar:
            postgres = _loads([sidecar], seconds, connections)
        hot_env = intake_env({"METERING_QUEUE_DSN": server.create_database("hot")})
        with ExitStack() as stack:
            replicas = [
                stack.enter_context(run_sidecar(hot_env, wait_ready=True)) for _ in range(REPLICAS)
            ]
            hot = _loads(replicas, seconds, connections)
    return GroupCommit(sqlite, postgres, hot)


def report(result: GroupCommit, connections: int) -> str:
    """The figures, a line each."""

    def errors(rate: Rate) -> str:
        return f", {rate.errors} errors" if rate.errors else ""

    def verdict(ok: bool) -> str:
        return "pass" if ok else "short"

    s, p, h = result.sqlite, result.postgres, result.hot_grain
    return "\n".join(
        [
            f"single  1-record calls/s, {connections} connections: PostgreSQL "
            f"{p.calls_per_second:,.0f} ({p.calls_per_commit:.1f} calls/commit{errors(p)}) vs "
            f"SQLite {s.calls_per_second:,.0f} ({s.calls_per_commit:.1f} calls/commit"
            f"{errors(s)}): PG/SQLite {result.ratio:.2f} (goal >= {SINGLE_GOAL}: "
            f"{verdict(result.ratio >= SINGLE_GOAL and not p.errors)})",
            f"hot     one grain, {REPLICAS} replicas x {connections} connections: "
            f"{h.calls_per_second:,.0f} calls/s together ({h.calls_per_commit:.1f} "
            f"calls/commit{errors(h)}) (goal >= {HOT_GOAL:,.0f}: "
            f"{verdict(h.calls_per_second >= HOT_GOAL and not h.errors)})",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(prog="benchmarks.group_commit")
    parser.add_argument("--seconds", type=int, default=4, help="seconds per load (default 4)")
    parser.add_argument(
        "--connections", type=int, default=16, help="connections per sidecar (default 16)"
    )
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.connections < 1:
        sys.exit("benchmarks.group_commit: --seconds and --connections must be at least 1")
    print(report(measure(args.seconds, args.connections), args.connections))


if __name__ == "__main__":
    main()
