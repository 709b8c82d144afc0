"""The embedded usage store: one SQLite file, WAL, ``synchronous=FULL``, group commit.

One writer thread owns the connection (``sqlite3`` blocks; the event loop
must not). Jobs queue up while a commit is under way, and the next
transaction takes all of them: each in its own savepoint, one COMMIT, one
fsync for the lot. A caller's future resolves only after that COMMIT, so a
202 means the record is on disk. The schema is versioned from day one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from app.queue import sqlite_queries as queries
from app.queue.aggregation import (
    MAX_RECORD_BYTES,
    GrainContent,
    GrainKey,
    GrainLimitExceeded,
    Usage,
    add_usage,
    batch_record,
    content_from_json,
    content_to_json,
    meter_usage_request,
    record_size,
)
from app.queue.migrations import MIGRATIONS
from app.queue.sqlite_queries import GRAIN_COLUMNS, grain_from_row, optional_time
from app.queue.store import (
    Filters,
    GrainPolicy,
    GrainRow,
    IdempotencyConflict,
    Intake,
    IntakeFailure,
    IntakeRefused,
    Outcome,
    QueueStats,
    Receipt,
    RecordRow,
    StoreUnavailable,
)

log = logging.getLogger("app.queue.store")
# Below this much free space on its volume the queue reports itself not ready.
MIN_FREE_BYTES = 256 * 1024
T = TypeVar("T")
_MAX_GROUP = 512
_KEY_WHERE = (
    "kind = ? AND product_code = ? AND license_arn = ? AND customer_identifier = ? "
    "AND customer_aws_account_id = ? AND dimension = ? AND hour = ?"
)


def _ts(value: datetime) -> float:
    return value.timestamp()


def _key_params(key: GrainKey) -> tuple[object, ...]:
    return (
        key.kind,
        key.product_code,
        key.license_arn,
        key.customer_identifier,
        key.customer_aws_account_id,
        key.dimension,
        int(key.hour.timestamp()),
    )


@dataclass(slots=True)
class _Job:
    run: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    # A readiness probe's own write proves little about room for real work.
    probe: bool = False


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class SqliteStore:
    """``UsageStore`` on one SQLite file, owned by this process."""

    def __init__(self, path: Path, policy: GrainPolicy) -> None:
        self.path = path
        self.policy = policy
        self.commits = 0
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._commit_error: str | None = None

    # -- plumbing ---------------------------------------------------------

    async def open(self) -> None:
        """Open the file, switch to WAL, apply migrations; raise ``StoreUnavailable`` if not."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="usage-store", daemon=True
        )
        self._thread.start()
        await ready

    async def close(self) -> None:
        """Finish queued jobs, checkpoint the WAL and close."""
        if self._thread is None:
            return
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join, 30)
        self._thread = None

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreUnavailable(f"{self.path}: cannot use WAL (journal_mode={mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            done = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
            for version, script in MIGRATIONS:
                if version in done:
                    continue
                for statement in script:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?)",
                    (version, datetime.now(UTC).timestamp()),
                )
                log.info("queue schema migrated", extra={"version": version})
            self._recompute_deadlines(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return conn

    def _recompute_deadlines(self, conn: sqlite3.Connection) -> None:
        # Deadlines follow the windows in force now, for grains already queued too.
        rows = conn.execute(
            f"SELECT {GRAIN_COLUMNS} FROM grains g WHERE g.status IN ('open', 'frozen')"
        ).fetchall()
        for grain in map(grain_from_row, rows):
            deadline = _ts(self.policy.deadline(grain.key, grain.content))
            if deadline != _ts(grain.deadline):
                conn.execute("UPDATE grains SET deadline = ? WHERE id = ?", (deadline, grain.id))

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = self._connect()
        except (sqlite3.Error, OSError, StoreUnavailable) as exc:
            error = StoreUnavailable(f"cannot open the usage queue at {self.path}: {exc}")
            self._loop.call_soon_threadsafe(_resolve, ready, None, error)
            return
        self._loop.call_soon_threadsafe(_resolve, ready, None, None)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    break
                group = [job]
                stop = False
                while len(group) < _MAX_GROUP:
                    try:
                        more = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    group.append(more)
                self._run_group(conn, group)
                if stop:
                    break
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()

    def _run_group(self, conn: sqlite3.Connection, group: list[_Job]) -> None:
        assert self._loop is not None
        results: list[tuple[Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            changes_before = conn.total_changes
            for job in group:
                conn.execute("SAVEPOINT job")
                try:
                    result = job.run(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    results.append((None, exc))
                else:
                    conn.execute("RELEASE job")
                    results.append((result, None))
            wrote = conn.total_changes != changes_before
            conn.execute("COMMIT")
            if wrote:
                self.commits += 1
                if not all(job.probe for job in group):
                    self._commit_error = None
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            log.error("usage store commit failed", extra={"error": str(exc)})
            self._commit_error = str(exc)
            failure = StoreUnavailable(f"the usage queue could not commit: {exc}")
            results = [(None, failure)] * len(group)
        for job, (result, error) in zip(group, results, strict=True):
            self._loop.call_soon_threadsafe(_resolve, job.future, result, error)

    async def _submit(self, run: Callable[[sqlite3.Connection], T], *, probe: bool = False) -> T:
        if self._thread is None or self._loop is None or not self._thread.is_alive():
            raise StoreUnavailable("the usage queue is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put(_Job(run, future, probe))
        return await future

    # -- intake -----------------------------------------------------------

    async def ingest(
        self, intakes: list[Intake], *, all_or_nothing: bool
    ) -> list[Receipt | IntakeFailure]:
        """Add records to their grains; one commit for the call (and its neighbours)."""

        def run(conn: sqlite3.Connection) -> list[Receipt | IntakeFailure]:
            outcomes: list[Receipt | IntakeFailure] = []
            for index, intake in enumerate(intakes):
                conn.execute("SAVEPOINT record")
                try:
                    outcomes.append(self._ingest_one(conn, intake))
                except IdempotencyConflict as exc:
                    conn.execute("ROLLBACK TO record")
                    outcomes.append(IntakeFailure(index, str(exc), conflict=True))
                except GrainLimitExceeded as exc:
                    conn.execute("ROLLBACK TO record")
                    outcomes.append(IntakeFailure(index, str(exc)))
                conn.execute("RELEASE record")
            failures = [o for o in outcomes if isinstance(o, IntakeFailure)]
            if all_or_nothing and failures:
                raise IntakeRefused(failures)
            return outcomes

        return await self._submit(run)

    def _ingest_one(self, conn: sqlite3.Connection, intake: Intake) -> Receipt:
        now = _ts(intake.received_at)
        if intake.idempotency_key is not None:
            seen = conn.execute(
                "SELECT k.record_id, k.content_hash, k.grain_id, k.hour, k.rolled_forward, "
                "COALESCE(g.status, k.outcome) FROM idempotency_keys k "
                "LEFT JOIN grains g ON g.id = k.grain_id WHERE k.key = ?",
                (intake.idempotency_key,),
            ).fetchone()
            if seen is not None:
                if seen[1] != intake.content_hash:
                    raise IdempotencyConflict(intake.idempotency_key, seen[0])
                hour = optional_time(seen[3])
                assert hour is not None
                return Receipt(seen[0], seen[2], hour, bool(seen[4]), True, seen[5] or "accepted")
        usage = intake.usage
        key = usage.key
        while True:
            row = conn.execute(
                f"SELECT id, status, content FROM grains WHERE {_KEY_WHERE}", _key_params(key)
            ).fetchone()
            if row is None or row[1] == "open":
                break
            # This grain has gone (or may have gone) to AWS: its content is
            # frozen. The usage counts in the next hour instead.
            key = key.next_hour()
        placed = Usage(key, usage.timestamp, usage.quantity, usage.decimal_form, usage.allocations)
        content = add_usage(content_from_json(row[2]) if row else GrainContent(), placed)
        if content.has_allocations and record_size(key, content) > MAX_RECORD_BYTES:
            raise GrainLimitExceeded("the grain's record would be over AWS's 1 MB request limit")
        deadline = _ts(self.policy.deadline(key, content))
        if row is None:
            grain_id = conn.execute(
                "INSERT INTO grains (kind, product_code, license_arn, customer_identifier, "
                "customer_aws_account_id, dimension, hour, status, content, due_at, deadline, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'open', ?, ?, ?, ?)",
                (
                    *_key_params(key),
                    content_to_json(content),
                    _ts(self.policy.due_at(key)),
                    deadline,
                    now,
                ),
            ).lastrowid
        else:
            grain_id = row[0]
            conn.execute(
                "UPDATE grains SET content = ?, deadline = ? WHERE id = ?",
                (content_to_json(content), deadline, grain_id),
            )
        assert grain_id is not None
        rolled = key != usage.key
        conn.execute(
            "INSERT INTO usage_records (id, idempotency_key, content_hash, grain_id, "
            "original_hour, rolled_forward, record, customer, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                intake.record_id,
                intake.idempotency_key,
                intake.content_hash,
                grain_id,
                int(usage.key.hour.timestamp()),
                int(rolled),
                json.dumps(intake.record, separators=(",", ":")),
                usage.key.customer(),
                now,
            ),
        )
        if intake.idempotency_key is not None:
            conn.execute(
                "INSERT INTO idempotency_keys (key, content_hash, record_id, grain_id, hour, "
                "rolled_forward, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    intake.idempotency_key,
                    intake.content_hash,
                    intake.record_id,
                    grain_id,
                    int(key.hour.timestamp()),
                    int(rolled),
                    now,
                ),
            )
        return Receipt(intake.record_id, grain_id, key.hour, rolled, False, "open")

    # -- sending ----------------------------------------------------------

    async def freeze_due(self, now: datetime, *, everything: bool = False) -> int:
        """Freeze due (or all) open grains: build each payload once, for good."""

        def run(conn: sqlite3.Connection) -> int:
            query = f"SELECT {GRAIN_COLUMNS} FROM grains g WHERE g.status = 'open'"
            params: tuple[object, ...] = ()
            if not everything:
                query += " AND g.due_at <= ?"
                params = (_ts(now),)
            rows = [grain_from_row(r) for r in conn.execute(query, params).fetchall()]
            for grain in rows:
                if grain.key.kind == "batch":
                    payload = batch_record(grain.key, grain.content)
                else:
                    payload = meter_usage_request(grain.key, grain.content, str(uuid.uuid4()))
                conn.execute(
                    "UPDATE grains SET status = 'frozen', payload = ?, frozen_at = ?, "
                    "next_attempt_at = ? WHERE id = ?",
                    (json.dumps(payload, separators=(",", ":")), _ts(now), _ts(now), grain.id),
                )
            return len(rows)

        return await self._submit(run)

    async def expire_overdue(self, now: datetime) -> list[GrainRow]:
        """Unsent grains past their submission deadline end ``expired``."""

        def run(conn: sqlite3.Connection) -> list[GrainRow]:
            rows = [
                grain_from_row(r)
                for r in conn.execute(
                    f"SELECT {GRAIN_COLUMNS} FROM grains g WHERE g.status IN ('open', 'frozen') "
                    "AND g.deadline <= ?",
                    (_ts(now),),
                ).fetchall()
            ]
            for grain in rows:
                conn.execute(
                    "UPDATE grains SET status = 'expired', reason = 'SubmissionWindowPassed', "
                    "finished_at = ? WHERE id = ?",
                    (_ts(now), grain.id),
                )
            return rows

        return await self._submit(run)

    async def sendable(
        self, now: datetime, limit: int, *, ignore_backoff: bool = False
    ) -> list[GrainRow]:
        """Frozen grains due for an attempt, oldest hour first."""
        where = "g.status = 'frozen'" + ("" if ignore_backoff else " AND g.next_attempt_at <= ?")
        params: tuple[object, ...] = (limit,) if ignore_backoff else (_ts(now), limit)
        return await self._submit(
            lambda conn: [
                grain_from_row(r)
                for r in conn.execute(
                    f"SELECT {GRAIN_COLUMNS} FROM grains g WHERE {where} "
                    "ORDER BY g.hour, g.id LIMIT ?",
                    params,
                ).fetchall()
            ]
        )

    async def settle(self, outcomes: list[Outcome], now: datetime) -> None:
        """Record outcomes in one commit."""

        def run(conn: sqlite3.Connection) -> None:
            for o in outcomes:
                if o.result == "retry":
                    conn.execute(
                        "UPDATE grains SET attempts = attempts + 1, next_attempt_at = ?, "
                        "last_error = ? WHERE id = ? AND status = 'frozen'",
                        (_ts(o.next_attempt_at or now), o.error, o.grain_id),
                    )
                else:
                    conn.execute(
                        "UPDATE grains SET status = ?, attempts = attempts + 1, "
                        "metering_record_id = ?, reason = ?, last_error = ?, finished_at = ? "
                        "WHERE id = ? AND status = 'frozen'",
                        (o.result, o.metering_record_id, o.reason, o.error, _ts(now), o.grain_id),
                    )

        await self._submit(run)

    # -- reading ----------------------------------------------------------

    async def get_record(self, record_id: str) -> RecordRow | None:
        """One record and its grain."""
        rows = await self._submit(
            lambda conn: queries.record_rows(conn, " AND r.id = ?", (record_id,), 1)
        )
        return rows[0] if rows else None

    async def list_records(
        self, filters: Filters, after: str | None, limit: int
    ) -> list[RecordRow]:
        """Records matching ``filters``, by id, after ``after``."""
        return await self._submit(lambda conn: queries.list_records(conn, filters, after, limit))

    async def get_grain(self, grain_id: int) -> GrainRow | None:
        """One grain."""
        rows = await self._submit(
            lambda conn: [
                grain_from_row(r)
                for r in conn.execute(
                    f"SELECT {GRAIN_COLUMNS} FROM grains g WHERE g.id = ?", (grain_id,)
                ).fetchall()
            ]
        )
        return rows[0] if rows else None

    async def list_grains(self, filters: Filters, after: int | None, limit: int) -> list[GrainRow]:
        """Grains matching ``filters``, by id, after ``after``."""
        return await self._submit(lambda conn: queries.list_grains(conn, filters, after, limit))

    async def stats(self, now: datetime) -> QueueStats:
        """Counts and ages for the metrics."""
        return await self._submit(lambda conn: queries.stats(conn, now))

    async def next_wakeup(self) -> datetime | None:
        """When the dispatcher has something to do next."""
        return await self._submit(queries.next_wakeup)

    async def prune(self, before: datetime, keys_before: datetime) -> int:
        """Forget grains that finished before ``before``, with their records, and
        IdempotencyKeys received before ``keys_before``."""
        return await self._submit(lambda conn: queries.prune(conn, before, keys_before))

    async def check_writable(self) -> None:
        """Raise ``StoreUnavailable`` unless real work could be committed now.

        A small write must reach the disk, the volume must have room to spare,
        and the last commit of real work must not have failed since one succeeded.
        """

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO store_heartbeat (id, at) VALUES (1, ?)",
                (datetime.now(UTC).timestamp(),),
            )

        await self._submit(run, probe=True)
        free = (await asyncio.to_thread(shutil.disk_usage, self.path.parent)).free
        if free < MIN_FREE_BYTES:
            raise StoreUnavailable(
                f"only {free} bytes free on the queue's volume ({self.path.parent})"
            )
        if self._commit_error is not None:
            raise StoreUnavailable(f"the last commit failed: {self._commit_error}")
