"""Usage-queue ingest: records/s and commits per request, SQLite and PostgreSQL side by side.

Starts a sandbox sidecar (its queue on a temp file; a long grace so nothing
is sent while measuring), loads ``POST /v1/usage-records`` with single-record
and batched calls from concurrent clients, and reads the store's commit
count from /metrics. Then the same with the shared PostgreSQL store
(``METERING_QUEUE_DSN``, a throwaway server as the tests start one). In the
same run it measures plain ``sqlite3`` inserts with the same durability (WAL,
synchronous=FULL): one commit per insert, and one commit per batch. Run:

    .venv/bin/python benchmarks/ingest.py [--seconds 5] [--concurrency 32] [--batch 100]

``scripts/bench`` uses :func:`intake_env`, :func:`intake_load` and :func:`plain_sqlite`
for its intake goals.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.load import LoadResult, drained_load, load
from tests.pg import PgServer
from tests.sidecar import run_sidecar

_COMMITS = re.compile(r"^metering_queue_commits (\S+)$", re.MULTILINE)


def _record(n: int) -> dict[str, object]:
    return {
        "CustomerAWSAccountId": f"{100000000000 + n % 500}",
        "LicenseArn": "arn:aws:license-manager::123456789012:license:l-0123456789abcdef",
        "Dimension": "requests",
        "Quantity": 1,
        "Timestamp": datetime.now(UTC).isoformat(),
    }


def intake_env(store_env: dict[str, str]) -> dict[str, str]:
    """A sandbox sidecar that queues and sends nothing while measured (a long grace),
    its store given by ``store_env`` (``METERING_QUEUE_PATH`` or ``METERING_QUEUE_DSN``)."""
    return {
        "METERING_MODE": "sandbox",
        "METERING_PRODUCT_CODE": "prod-bench",
        "METERING_ACCESS_LOG": "false",
        "METERING_QUEUE_GRACE": "3600",
        **store_env,
    }


def records_body(batch: int) -> bytes:
    """A ``POST /v1/usage-records`` body of ``batch`` records."""
    return json.dumps({"UsageRecords": [_record(n) for n in range(batch)]}).encode()


def intake_load(url: str, *, seconds: int, connections: int, batch: int) -> LoadResult:
    """Load ``POST /v1/usage-records`` with ``batch``-record calls (errors counted).

    Single-record calls go through wrk; calls of many records (a large part of a
    second each) through :func:`drained_load`, which does not drop the calls in
    flight at the deadline.
    """
    url = f"{url}/v1/usage-records"
    body = records_body(batch)
    if batch == 1:
        return load(url, seconds=seconds, connections=connections, body=body)
    return drained_load(url, seconds=seconds, connections=connections, body=body)


def _load(url: str, seconds: float, concurrency: int, batch: int) -> tuple[int, int]:
    """(requests, records) sent; any error fails the run."""
    result = intake_load(url, seconds=max(1, round(seconds)), connections=concurrency, batch=batch)
    if result.errors:
        raise RuntimeError(f"{result.tool} saw {result.errors} errors loading {url}")
    return result.requests, result.requests * batch


def _commits(client: httpx.Client) -> float:
    match = _COMMITS.search(client.get("/metrics").text)
    assert match is not None
    return float(match.group(1))


def plain_sqlite(path: Path, seconds: float, batch: int) -> float:
    """Rows per second that plain ``sqlite3`` inserts into ``path`` with the queue's
    durability (WAL, synchronous=FULL), ``batch`` rows per fsync'd commit, for ``seconds``."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body TEXT)")
    rows_per_commit = [(json.dumps(_record(n)),) for n in range(batch)]
    rows = 0
    stop_at = time.monotonic() + seconds
    started = time.monotonic()
    while time.monotonic() < stop_at:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t (body) VALUES (?)", rows_per_commit)
        conn.execute("COMMIT")
        rows += batch
    elapsed = time.monotonic() - started
    conn.close()
    return rows / elapsed


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    rows: list[tuple[str, float, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp, PgServer() as postgres:
        stores = (
            ("sqlite", {"METERING_QUEUE_PATH": str(Path(tmp) / "queue.sqlite3")}),
            ("postgresql", {"METERING_QUEUE_DSN": postgres.create_database("bench")}),
        )
        for store, env in stores:
            with run_sidecar(intake_env(env)) as sidecar:
                _load(sidecar.url, 1, args.concurrency, 1)  # warm-up
                for label, batch in (
                    (f"sidecar ({store}), 1 record/request", 1),
                    (f"sidecar ({store}), {args.batch}/request", args.batch),
                ):
                    before = _commits(sidecar.client)
                    started = time.monotonic()
                    requests, records = _load(sidecar.url, args.seconds, args.concurrency, batch)
                    elapsed = time.monotonic() - started
                    commits = _commits(sidecar.client) - before
                    rows.append(
                        (label, records / elapsed, requests / elapsed, f"{commits / requests:.3f}")
                    )
        plain_one = plain_sqlite(Path(tmp) / "plain-1.sqlite3", args.seconds, 1)
        plain_batch = plain_sqlite(Path(tmp) / "plain-n.sqlite3", args.seconds, args.batch)
    rows.append(("plain sqlite3, 1 insert/commit", plain_one, plain_one, "1.000"))
    rows.append(
        (
            f"plain sqlite3, {args.batch} inserts/commit",
            plain_batch,
            plain_batch / args.batch,
            "1.000",
        )
    )
    print(f"{'':40} {'records/s':>10} {'calls/s':>9} {'commits/call':>12}")
    for label, records_rate, calls_rate, fsyncs in rows:
        print(f"{label:40} {records_rate:>10.0f} {calls_rate:>9.0f} {fsyncs:>12}")
    single = rows[0][1]
    print(
        f"sidecar single-record ingest / plain one-commit inserts: x{single / plain_one:.2f} "
        "(group commit lets concurrent calls share an fsync)"
    )


if __name__ == "__main__":
    main()
