"""Where a 1,000-record intake call's time goes, in-process: checking, planning, SQL.

Takes the benchmark's own call (``benchmarks.ingest.records_body``: 1,000 records
of 500 customers, one license, one hour) through the sidecar's parts without
HTTP: ``check_records`` (validation, hashing, stored form: the event loop's
share), then the SQLite store's ``_ingest`` in a transaction (the writer thread's
share), with every SQL statement it runs timed apart through a thin recording
connection, and the commit. Beside them, plain ``sqlite3`` inserting the same
number of JSON rows into a table without indexes, as goal 5 compares with.

Prints microseconds per record for each part (medians over ``--calls`` calls
into one growing store). The SQL row is the floor of this store's intake: the
statements its schema needs (a grain lookup, grain writes, a record row under
five indexes), with no Python around them.

Then the floor of any store shape (``floor``): what a record answered 202 needs in
Python whatever the store does with it (validating the call, the record's canonical
content and its hash, which replays by IdempotencyKey compare, its receipt and the
answer's JSON), beside the plain insert, and the best ratio to plain ``sqlite3`` that
leaves. Run:

    .venv/bin/python -m benchmarks.intake_split [--calls 30]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import TypeAdapter

from app.queue.intake import IntakeRules, check_records
from app.queue.records import QueuedRecordReceipt, QueuedUsageRecord, UsageRecordsReceipt
from app.queue.sqlite import SqliteStore
from app.queue.store import GrainPolicy
from benchmarks.ingest import records_body


class _Timed:
    """A connection whose statements add their time (fetching included) to ``spent``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.spent = 0.0

    def execute(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        started = time.perf_counter()
        rows = self.conn.execute(sql, tuple(params)).fetchall()
        self.spent += time.perf_counter() - started
        return rows

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        prepared = [tuple(row) for row in rows]
        started = time.perf_counter()
        self.conn.executemany(sql, prepared)
        self.spent += time.perf_counter() - started


def _plain(path: Path, records: int, calls: int) -> list[float]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")
    rows = [(json.dumps({"n": n, "Dimension": "requests"}),) for n in range(records)]
    spent = []
    for _ in range(calls):
        started = time.perf_counter()
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t (body) VALUES (?)", rows)
        conn.execute("COMMIT")
        spent.append(time.perf_counter() - started)
    conn.close()
    return spent


def measure(calls: int) -> dict[str, float]:
    """Median microseconds per record of each part."""
    body = json.loads(records_body(1000))["UsageRecords"]
    policy = GrainPolicy(grace=timedelta(hours=1))
    rules = IntakeRules(
        mode="saas", product_code="prod-bench", policy=policy, future_tolerance=timedelta(minutes=5)
    )
    parts: dict[str, list[float]] = {"check": [], "plan": [], "sql": [], "commit": []}
    with tempfile.TemporaryDirectory(prefix="intake-split-") as tmp:
        store = SqliteStore(Path(tmp) / "queue.sqlite3", policy)
        conn = store._connect()  # the store's own writer connection
        for _ in range(calls):
            started = time.perf_counter()
            good, bad = check_records(body, rules, datetime.now(UTC))
            checked = time.perf_counter()
            assert not bad
            timed = _Timed(conn)
            conn.execute("BEGIN IMMEDIATE")
            ingest_started = time.perf_counter()
            store._ingest(timed, [intake for _, intake in good], True)  # type: ignore[arg-type]
            ingested = time.perf_counter()
            conn.execute("COMMIT")
            committed = time.perf_counter()
            parts["check"].append(checked - started)
            parts["plan"].append(ingested - ingest_started - timed.spent)
            parts["sql"].append(timed.spent)
            parts["commit"].append(committed - ingested)
        conn.close()
        parts["plain sqlite3"] = _plain(Path(tmp) / "plain.sqlite3", len(body), calls)
    return {name: statistics.median(values) / len(body) * 1e6 for name, values in parts.items()}


def _median_per_record(work: Callable[[], object], records: int, calls: int) -> float:
    spent = []
    for _ in range(calls):
        started = time.perf_counter()
        work()
        spent.append(time.perf_counter() - started)
    return statistics.median(spent) / records * 1e6


def floor(calls: int) -> dict[str, float]:
    """Microseconds per record of the least any store shape must do in Python for a
    record it answers 202 (the same call, the same run): validate it, put it in its
    canonical form and hash it (replays by IdempotencyKey compare that hash), and
    write its receipt into the answer; beside the plain insert of goal 5's comparison."""
    body = json.loads(records_body(1000))["UsageRecords"]
    text = json.dumps(body).encode()
    records = TypeAdapter(list[QueuedUsageRecord])
    models = records.validate_json(text)
    dumped = [m.model_dump(mode="json", exclude_none=True) for m in models]
    canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
    hour = models[0].Timestamp
    assert hour is not None

    def receipts() -> UsageRecordsReceipt:
        return UsageRecordsReceipt.model_construct(
            Accepted=[
                QueuedRecordReceipt.model_construct(
                    Index=n,
                    Id=f"ur_{n:028x}",
                    Status="pending",
                    GrainId=n,
                    Hour=hour,
                    RolledForward=False,
                    Replayed=False,
                )
                for n in range(len(models))
            ],
            Rejected=[],
        )

    answer = receipts()
    parts = {
        "validate": lambda: records.validate_json(text),
        "dump": lambda: [m.model_dump(mode="json", exclude_none=True) for m in models],
        "hash": lambda: [hashlib.sha256(canonical.encode(d).encode()).hexdigest() for d in dumped],
        "receipts": receipts,
        "render": lambda: answer.model_dump_json(exclude_none=True),
    }
    figures = {name: _median_per_record(work, len(models), calls) for name, work in parts.items()}
    with tempfile.TemporaryDirectory(prefix="intake-floor-") as tmp:
        figures["plain sqlite3"] = (
            statistics.median(_plain(Path(tmp) / "plain.sqlite3", len(body), calls))
            / len(body)
            * 1e6
        )
    return figures


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    figures = measure(args.calls)
    labels = {
        "check": "check_records (event loop): validate, hash, stored form",
        "plan": "store: plan and Python around the SQL (writer thread)",
        "sql": "store: the SQL statements alone",
        "commit": "store: commit (fsync)",
        "plain sqlite3": "plain sqlite3: the same number of rows, no index, commit",
    }
    for name, label in labels.items():
        print(f"{figures[name]:8.1f} us/record  {label}")
    store_total = figures["check"] + figures["plan"] + figures["sql"] + figures["commit"]
    print(f"{store_total:8.1f} us/record  in all, without HTTP")
    store_sql = figures["sql"] + figures["commit"]
    print(
        f"ratio to plain sqlite3: in all {figures['plain sqlite3'] / store_total:.3f}, "
        f"the store's SQL and commit alone {figures['plain sqlite3'] / store_sql:.3f}"
    )
    least = floor(args.calls)
    print("\nthe least any store shape does in Python per record (no grain, no rule):")
    floor_labels = {
        "validate": "validate the call's JSON (pydantic, from bytes)",
        "dump": "the record's canonical content (model_dump)",
        "hash": "canonical JSON text and its SHA-256",
        "receipts": "the receipt of each record",
        "render": "the answer's JSON",
    }
    for name, label in floor_labels.items():
        print(f"{least[name]:8.1f} us/record  {label}")
    python = sum(least[name] for name in floor_labels)
    plain = least["plain sqlite3"]
    print(f"{python:8.1f} us/record  in all; with plain sqlite3's insert ({plain:.1f} us)")
    print(f"best ratio any store shape could reach: {plain / (python + plain):.3f}")


if __name__ == "__main__":
    main()
