"""The embedded usage store: one SQLite file, WAL, ``synchronous=FULL``, group commit.

One writer thread owns the connection (``sqlite3`` blocks; the event loop
must not). Jobs queue up while a commit is under way, and the next
transaction takes all of them: each in its own savepoint (none for a job
alone), one COMMIT, one fsync for the lot. Consecutive intake calls among
them are placed as one plan (``app.queue.plan.place_calls``, as the
PostgreSQL store's group, up to ``_UNIT_RECORDS`` records): the customers
they name and each grain they touch read once, each grain written once, their
records in one batch, each call's outcome the one it would have alone; a
database fault among them writes each call again alone, so that it fails only
the call whose records caused it. A caller's future resolves only after that
COMMIT, so a 202 means the record is on disk. The schema is versioned from day
one.

Every database fault (any ``sqlite3.Error``, any ``OSError``) leaves the
store's methods as ``StoreUnavailable``: the API answers a retryable 503 and
``/readyz`` says why, never a 500.

Reads (the listings, one record or grain, the metrics' counts, the
dispatcher's next wake-up) go to a second connection on a reader thread of
their own: WAL lets it read the last commit while the writer writes, so a
listing never waits behind a large intake and an intake never waits behind a
listing. A read sees every commit whose future has resolved. What the
dispatcher sends and settles stays on the writer, in write order.

The store remembers which file it opened (device and inode). If the path
stops naming that file, deleted or replaced while the sidecar runs, new
records and the readiness probe are refused for good: a 202 would put them
in a file nobody will read again, and reopening the path would make a fresh
database that hides the loss. What was committed before stays readable, and
the dispatcher goes on sending it, until the process restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from app.metering.grains import (
    GrainKey,
    frozen_payload,
)
from app.metering.subscriptions import SubscriptionEvent
from app.queue import queries, registry
from app.queue.migrations import MIGRATIONS
from app.queue.plan import CallOutcome, GrainRowData, GroupPlacement, place_calls
from app.queue.queries import (
    GRAIN_COLUMNS,
    changed_deadlines,
    grain_from_row,
    settle_statements,
)
from app.queue.records import Filters
from app.queue.registry import (
    ClosedCustomer,
    CustomerRefused,
    CustomerRow,
    EventOutcome,
    Identity,
    drive_sync,
)
from app.queue.store import (
    GrainPolicy,
    GrainRow,
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
# Records of consecutive intake calls placed and written together in one unit, at most.
_UNIT_RECORDS = 1000
# Called with each connection the store opens (the writer's, the reader's), before the
# store uses it, on the thread that will: how a test counts the work done on them.
OnConnect = Callable[[sqlite3.Connection], None]


def _ts(value: datetime) -> float:
    return value.timestamp()


def _fetch(conn: sqlite3.Connection, query: queries.Query) -> list[Any]:
    return conn.execute(*query).fetchall()


def _run_script(conn: sqlite3.Connection, script: registry.Script[T]) -> T:
    """A registry script on ``conn``, in the transaction of the job running it."""
    # list(): a cursor's rows (or what a wrapping connection returns, as the benchmarks'
    # timing one does).
    return drive_sync(script, lambda sql, params: list(conn.execute(sql, params)))


@dataclass(slots=True)
class _Job:
    run: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    # A readiness probe's own write proves little about room for real work.
    probe: bool = False
    # New usage or the readiness probe: refused once the path names another file.
    guarded: bool = False
    # An intake call (its records, all or nothing): consecutive ones in a group are
    # placed and written together, as one plan (``SqliteStore._ingest_calls``); one
    # alone runs as ``run``, which does the same for it alone.
    intake: tuple[list[Intake], bool] | None = None


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _units(group: list[_Job], refusing: bool) -> list[list[int]]:
    """The group's jobs (positions) as the units its transaction runs, in order: each job
    alone, but consecutive intake calls together, up to ``_UNIT_RECORDS`` records (a
    larger call goes alone). Guarded jobs are left out while new work is refused."""
    units: list[list[int]] = []
    records = 0
    for n, job in enumerate(group):
        if refusing and job.guarded:
            continue
        size = len(job.intake[0]) if job.intake is not None else 0
        previous = group[units[-1][0]] if units else None
        if (
            job.intake is not None
            and previous is not None
            and previous.intake is not None
            and records + size <= _UNIT_RECORDS
        ):
            units[-1].append(n)
            records += size
        else:
            units.append([n])
            records = size
    return units


def _refuse_left(loop: asyncio.AbstractEventLoop, jobs: queue.SimpleQueue[_Job | None]) -> None:
    """A thread that has stopped answers what is still queued: nothing waits forever."""
    closed = StoreUnavailable("the usage queue is closed")
    while True:
        try:
            left = jobs.get_nowait()
        except queue.Empty:
            return
        if left is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, left.future, None, closed)


class _Reader:
    """A second, read-only connection to the store's file, on its own thread.

    Each job runs in one read transaction, so a job of several queries reads
    one snapshot. Database faults come out as ``StoreUnavailable``.
    """

    def __init__(self, path: Path, on_connect: OnConnect | None = None) -> None:
        self.path = path
        self._on_connect = on_connect
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> None:
        """Connect (the writer has made the file and its schema); raise ``StoreUnavailable``."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="usage-store-reader", daemon=True
        )
        self._thread.start()
        await ready

    async def close(self, budget: float) -> None:
        """Let the reads under way finish, ``budget`` seconds at most, and disconnect."""
        if self._thread is None:
            return
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join, max(budget, 0.1))
        self._thread = None

    async def submit(self, run: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None or self._loop is None or not self._thread.is_alive():
            raise StoreUnavailable("the usage queue is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put(_Job(run, future))
        return await future

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            if self._on_connect is not None:
                self._on_connect(conn)
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            # SQLite opens the file at the first read: do it now, while the path
            # names the writer's file, so that the reader holds that one.
            conn.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = self._connect()
        except (sqlite3.Error, OSError) as exc:
            failed = StoreUnavailable(f"cannot open the usage queue at {self.path} to read: {exc}")
            self._loop.call_soon_threadsafe(_resolve, ready, None, failed)
            return
        self._loop.call_soon_threadsafe(_resolve, ready, None, None)
        try:
            while (job := self._jobs.get()) is not None:
                result, error = self._read(conn, job)
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(_resolve, job.future, result, error)
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            _refuse_left(self._loop, self._jobs)

    @staticmethod
    def _read(conn: sqlite3.Connection, job: _Job) -> tuple[Any, BaseException | None]:
        try:
            conn.execute("BEGIN")
            try:
                return job.run(conn), None
            finally:
                conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            log.error("usage store read failed", extra={"error": str(exc)})
            error = StoreUnavailable(f"the usage queue could not read: {exc}")
            error.__cause__ = exc
            return None, error
        except Exception as exc:
            # The reader thread must go on for the next read.
            log.exception("usage store read failed")
            return None, StoreUnavailable(f"the usage queue could not read: {exc!r}")


def apply_migrations(
    conn: sqlite3.Connection,
    table: str,
    migrations: Sequence[tuple[int, Sequence[str]]],
    logger: logging.Logger,
    message: str,
) -> list[int]:
    """Run the migrations ``table`` does not list yet, in order, recording each there
    (in the caller's transaction, if any); each applied one is logged as ``message``.
    Returns the versions applied."""
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {table} "
        "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    done = {v for (v,) in conn.execute(f"SELECT version FROM {table}")}
    applied = []
    for version, script in migrations:
        if version in done:
            continue
        for statement in script:
            conn.execute(statement)
        conn.execute(f"INSERT INTO {table} VALUES (?, ?)", (version, datetime.now(UTC).timestamp()))
        logger.info(message, extra={"version": version})
        applied.append(version)
    return applied


class SqliteStore:
    """``UsageStore`` on one SQLite file, owned by this process."""

    def __init__(
        self, path: Path, policy: GrainPolicy, *, on_connect: OnConnect | None = None
    ) -> None:
        self.path = path
        self.policy = policy
        self.commits = 0
        self.scope = "replica"
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._commit_error: str | None = None
        self._closing = False
        # (st_dev, st_ino) of the file opened, and why the path no longer names it.
        self._identity: tuple[int, int] | None = None
        self._lost: str | None = None
        self._reader = _Reader(path, on_connect)
        self._on_connect = on_connect

    # -- plumbing ---------------------------------------------------------

    async def open(self) -> None:
        """Open the file, switch to WAL, apply migrations; raise ``StoreUnavailable`` if not."""
        self._loop = asyncio.get_running_loop()
        self._closing = False
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="usage-store", daemon=True
        )
        self._thread.start()
        await ready
        try:
            await self._reader.open()
        except BaseException:
            await self.close()
            raise

    async def close(self, budget: float = 30.0) -> None:
        """Finish queued jobs, checkpoint the WAL and close, waiting ``budget`` seconds at
        most (committed work is safe either way: only the checkpoint may be left)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + budget
        writer = self._thread
        if writer is not None:
            # Refused from now on; what is queued already is done.
            self._closing = True
            self._jobs.put(None)
        # Reads under way finish (an idle reader does not hold the checkpoint back).
        await self._reader.close(min(budget, 5.0))
        if writer is None:
            return
        await asyncio.to_thread(writer.join, max(end - loop.time(), 0.1))
        self._thread = None

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            if self._on_connect is not None:
                self._on_connect(conn)
            return self._prepare(conn)
        except BaseException:
            conn.close()
            raise

    def _prepare(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreUnavailable(f"{self.path}: cannot use WAL (journal_mode={mode})")
        # The file exists now (the pragma read its header): this is the one to write.
        opened = os.stat(self.path)
        self._identity = (opened.st_dev, opened.st_ino)
        conn.execute("PRAGMA synchronous=FULL")
        # Off while migrating (a no-op inside a transaction, so before it): a migration
        # that rebuilds a table, SQLite's way to change a column, must not cascade the
        # drop of the old table to the rows that refer to it. Checked before the commit.
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("BEGIN IMMEDIATE")
        try:
            applied = apply_migrations(
                conn, "schema_migrations", MIGRATIONS, log, "queue schema migrated"
            )
            self._recompute_deadlines(conn)
            # Only after a migration: the check reads every row that refers to another
            # (every record), and a start must not cost what the store holds.
            broken = conn.execute("PRAGMA foreign_key_check").fetchall() if applied else []
            if broken:
                raise StoreUnavailable(
                    f"{self.path}: the migrated schema breaks {len(broken)} foreign keys "
                    f"(first: {tuple(broken[0])}); nothing was changed"
                )
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _recompute_deadlines(self, conn: sqlite3.Connection) -> None:
        # Deadlines follow the windows in force now, for grains already queued too.
        rows = [grain_from_row(r) for r in conn.execute(queries.UNSETTLED).fetchall()]
        for grain_id, deadline in changed_deadlines(rows, self.policy):
            conn.execute(queries.SET_DEADLINE, (deadline, grain_id))

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = self._connect()
        except Exception as exc:
            if not isinstance(exc, sqlite3.Error | OSError | StoreUnavailable):
                log.exception("usage store failed to open")
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
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            _refuse_left(self._loop, self._jobs)

    def _check_file(self, conn: sqlite3.Connection) -> StoreUnavailable | None:
        """Why new work must not go into the file open now, or ``None``.

        One ``stat`` of the path, compared with the file opened; once the path
        names no file or another one, the answer stays no until a restart.
        """
        if self._lost is None:
            try:
                now = os.stat(self.path)
            except (FileNotFoundError, NotADirectoryError):
                found = "no file any more"
            except OSError as exc:
                return StoreUnavailable(f"cannot check the usage queue file {self.path}: {exc}")
            else:
                if (now.st_dev, now.st_ino) == self._identity:
                    return None
                found = "another file"
            self._lost = (
                f"the usage queue file {self.path} was deleted or replaced while the sidecar "
                f"ran (the path now names {found}); not writing into a file nobody will read "
                "again: restart the sidecar to queue into the file at that path (records "
                "queued before are only in the old file, and are lost at the restart)"
            )
            records: int | None = None
            with contextlib.suppress(sqlite3.Error):
                records = int(conn.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0])
            log.error(
                f"{self._lost}. New records are refused; what is queued goes on being sent "
                "while this process runs.",
                extra={"path": str(self.path), "records_in_unlinked_file": records},
            )
        return StoreUnavailable(self._lost)

    def _run_unit(
        self,
        conn: sqlite3.Connection,
        group: list[_Job],
        unit: list[int],
        results: list[tuple[Any, BaseException | None]],
        *,
        savepoint: bool,
    ) -> Exception | None:
        """Run one unit of the group's transaction (a job, or intake calls placed
        together), under a savepoint unless it is alone; set its jobs' results (a call
        refused whole gets its ``IntakeRefused``). Returns the exception that undid it
        (without a savepoint: the whole transaction), None if it ran."""
        first = group[unit[0]]
        if savepoint:
            conn.execute("SAVEPOINT job")
        try:
            if len(unit) == 1:
                results[unit[0]] = (first.run(conn), None)
            else:
                calls = [job.intake for job in (group[n] for n in unit) if job.intake]
                for n, outcome in zip(unit, self._ingest_calls(conn, calls), strict=True):
                    if isinstance(outcome, IntakeRefused):
                        results[n] = (None, outcome)
                    else:
                        results[n] = (outcome, None)
        except Exception as exc:
            if savepoint:
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
            else:
                conn.execute("ROLLBACK")
            refused: Exception = exc
            if isinstance(exc, sqlite3.Error | OSError):
                # A database fault, not an answer about the records.
                log.error("usage store write failed", extra={"error": str(exc)})
                if not first.probe:
                    self._commit_error = str(exc)
                refused = StoreUnavailable(f"the usage queue could not write: {exc}")
                refused.__cause__ = exc
            for n in unit:
                results[n] = (None, refused)
            return exc
        if savepoint:
            conn.execute("RELEASE job")
        return None

    def _run_group(self, conn: sqlite3.Connection, group: list[_Job]) -> None:
        assert self._loop is not None
        results: list[tuple[Any, BaseException | None]] = [(None, None)] * len(group)
        try:
            refusal = self._check_file(conn) if any(job.guarded for job in group) else None
            units = _units(group, refusal is not None)
            for n, job in enumerate(group):
                if refusal is not None and job.guarded:
                    results[n] = (None, refusal)
            changes_before = conn.total_changes
            # A job alone in its transaction needs no savepoint: undoing it is undoing
            # the transaction (two statements fewer for a call that comes alone).
            alone = len(units) == 1 and len(units[0]) == 1
            rolled_back = faulted = False
            if units:
                conn.execute("BEGIN IMMEDIATE")
            for unit in units:
                fault = self._run_unit(conn, group, unit, results, savepoint=not alone)
                faulted = faulted or isinstance(fault, sqlite3.Error | OSError)
                rolled_back = alone and fault is not None
                if fault is not None and len(unit) > 1:
                    # A fault in calls placed together: each is written again alone, so
                    # that only a call whose own records the database refuses fails.
                    for n in unit:
                        self._run_unit(conn, group, [n], results, savepoint=True)
            run = [group[n] for unit in units for n in unit]
            wrote = not rolled_back and conn.total_changes != changes_before
            if units and not rolled_back:
                conn.execute("COMMIT")
            if wrote:
                self.commits += 1
                if not faulted and not all(job.probe for job in run):
                    self._commit_error = None
        except (sqlite3.Error, OSError) as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            log.error("usage store commit failed", extra={"error": str(exc)})
            self._commit_error = str(exc)
            failure = StoreUnavailable(f"the usage queue could not commit: {exc}")
            results = [(None, failure)] * len(group)
        except Exception as exc:
            # Not a database error, but nothing of the group is known to be kept,
            # and the writer thread must go on for the next one.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            log.exception("usage store group failed")
            self._commit_error = repr(exc)
            failure = StoreUnavailable(f"the usage queue could not commit: {exc!r}")
            results = [(None, failure)] * len(group)
        for job, (result, error) in zip(group, results, strict=True):
            # A closed loop has nobody left waiting; the thread itself must go on.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_resolve, job.future, result, error)

    async def _submit(
        self,
        run: Callable[[sqlite3.Connection], T],
        *,
        probe: bool = False,
        guarded: bool = False,
        intake: tuple[list[Intake], bool] | None = None,
    ) -> T:
        if (
            self._thread is None
            or self._loop is None
            or self._closing
            or not self._thread.is_alive()
        ):
            raise StoreUnavailable("the usage queue is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put(_Job(run, future, probe, guarded, intake))
        return await future

    # -- intake -----------------------------------------------------------

    async def ingest(
        self, intakes: list[Intake], *, all_or_nothing: bool
    ) -> list[Receipt | IntakeFailure]:
        """Add a call's records to their grains (``app.queue.plan``): each grain read and
        written once; one commit for the call and the calls waiting with it, which are
        placed and written together with it (``_ingest_calls``)."""
        call = (intakes, all_or_nothing)
        return await self._submit(
            lambda conn: self._ingest(conn, intakes, all_or_nothing), guarded=True, intake=call
        )

    def _ingest(
        self, conn: sqlite3.Connection, intakes: list[Intake], all_or_nothing: bool
    ) -> list[Receipt | IntakeFailure]:
        """One call's records, placed and written (raises ``IntakeRefused``)."""
        (outcome,) = self._ingest_calls(conn, [(intakes, all_or_nothing)])
        if isinstance(outcome, IntakeRefused):
            raise outcome
        return outcome

    def _ingest_calls(
        self, conn: sqlite3.Connection, calls: list[tuple[list[Intake], bool]]
    ) -> list[CallOutcome]:
        """Calls' records, placed as one plan (``app.queue.plan.place_calls``, as the
        PostgreSQL store's group): the customers they name and each grain they touch
        read once, each grain written once, records and keys in one batch each."""
        # The customers the records name, in this transaction: a registry change
        # commits wholly before it or after it (one writer).
        customers = _run_script(
            conn,
            registry.intake_index(
                (i.usage.key for intakes, _ in calls for i in intakes), postgres=False
            ),
        )
        rows: dict[GrainKey, GrainRowData | None] = {}
        seen: dict[str, tuple[Any, ...]] = {}
        looked_up: set[str] = set()
        script = place_calls(calls, range(len(calls)), self.policy, customers)
        plan = next(script)
        while True:
            plan.provide(rows)
            while keys := plan.missing():
                found: dict[GrainKey, GrainRowData | None] = dict.fromkeys(keys)
                for statement in queries.grains_for_keys(keys):
                    for row in conn.execute(*statement):
                        found[queries.grain_key_of(row)] = (row[7], row[8], row[9])
                rows.update(found)
                plan.provide(found)
            unread = [k for k in dict.fromkeys(plan.keys()) if k not in looked_up]
            for statement in queries.seen_keys(unread):
                seen.update((row[0], tuple(row[1:])) for row in conn.execute(*statement))
            looked_up.update(unread)
            try:
                plan = script.send(seen)
            except StopIteration as stop:
                placement: GroupPlacement = stop.value
                break
        plan = placement.plan
        new = plan.new_grains()
        by_key = {queries.key_params(grain.key): grain for grain, _ in new}
        for statement in queries.insert_grains([values for _, values in new]):
            for row in conn.execute(*statement):
                by_key[tuple(row[:7])].id = row[7]
        conn.executemany(queries.UPDATE_GRAIN, plan.grain_updates())
        conn.executemany(queries.INSERT_RECORD, plan.record_rows())
        conn.executemany(queries.INSERT_KEY, plan.key_rows())
        outcomes = plan.outcomes()
        placed: list[CallOutcome] = []
        for n, (intakes, _) in enumerate(calls):
            outcome = placement.outcome(n, len(intakes), outcomes)
            assert outcome is not None  # every call is placed or refused
            placed.append(outcome)
        return placed

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
                payload = frozen_payload(grain.key, grain.content, str(uuid.uuid4()))
                conn.execute(queries.FREEZE, (payload, _ts(now), _ts(now), grain.id))
            return len(rows)

        return await self._submit(run)

    async def expire_overdue(self, now: datetime) -> list[GrainRow]:
        """Unsent grains past their submission deadline end ``expired``."""

        def run(conn: sqlite3.Connection) -> list[GrainRow]:
            rows = [
                grain_from_row(r)
                for r in conn.execute(
                    queries.UNSETTLED + " AND g.deadline <= ?", (_ts(now),)
                ).fetchall()
            ]
            for grain in rows:
                conn.execute(queries.EXPIRE, (_ts(now), grain.id))
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
            for statement, params in settle_statements(outcomes, now):
                conn.execute(statement, params)

        await self._submit(run)

    # -- reading ----------------------------------------------------------

    async def get_record(self, record_id: str) -> RecordRow | None:
        """One record and its grain."""
        rows = await self._reader.submit(lambda conn: _fetch(conn, queries.record_query(record_id)))
        return queries.record_from_row(rows[0]) if rows else None

    async def list_records(
        self, filters: Filters, after: str | None, limit: int
    ) -> list[RecordRow]:
        """Records matching ``filters``, by id, after ``after``."""
        query = queries.list_records_query(filters, after, limit)
        rows = await self._reader.submit(lambda conn: _fetch(conn, query))
        return [queries.record_from_row(row) for row in rows]

    async def get_grain(self, grain_id: int) -> GrainRow | None:
        """One grain."""
        rows = await self._reader.submit(lambda conn: _fetch(conn, queries.grain_query(grain_id)))
        return grain_from_row(rows[0]) if rows else None

    async def list_grains(self, filters: Filters, after: int | None, limit: int) -> list[GrainRow]:
        """Grains matching ``filters``, by id, after ``after``."""
        query = queries.list_grains_query(filters, after, limit)
        rows = await self._reader.submit(lambda conn: _fetch(conn, query))
        return [grain_from_row(row) for row in rows]

    async def stats(self, now: datetime) -> QueueStats:
        """Counts and ages for the metrics."""

        def run(conn: sqlite3.Connection) -> QueueStats:
            return queries.stats_from_rows(
                conn.execute(queries.PENDING_RECORDS).fetchone(),
                conn.execute(queries.OPEN_GRAINS, (now.timestamp(),)).fetchone(),
                conn.execute(queries.FROZEN_GRAINS).fetchone(),
            )

        return await self._reader.submit(run)

    async def next_wakeup(self) -> datetime | None:
        """When the dispatcher has something to do next."""
        return await self._reader.submit(
            lambda conn: queries.wakeup_from_row(conn.execute(queries.NEXT_WAKEUP).fetchone())
        )

    async def prune(self, before: datetime, keys_before: datetime) -> int:
        """Forget grains that finished before ``before``, with their records, and
        IdempotencyKeys received before ``keys_before``."""

        def run(conn: sqlite3.Connection) -> int:
            conn.execute(queries.PRUNE_KEEP_OUTCOMES, (before.timestamp(),))
            pruned = conn.execute(queries.PRUNE_GRAINS, (before.timestamp(),)).rowcount
            conn.execute(queries.PRUNE_KEYS, (keys_before.timestamp(),))
            return pruned

        return await self._submit(run)

    # -- the customer registry ----------------------------------------------

    async def apply_event(
        self, event: SubscriptionEvent, now: datetime, grace: timedelta
    ) -> EventOutcome:
        """Apply a subscription event once: its id and its effect in one commit."""
        # Guarded: an event applied to a file nobody reads again would be lost once
        # its message is deleted from the events queue.
        return await self._submit(
            lambda conn: _run_script(conn, registry.apply_event(event, now, grace, postgres=False)),
            guarded=True,
        )

    async def record_customer(self, identity: Identity, now: datetime) -> CustomerRow:
        """Register a ResolveCustomer answer."""
        return await self._submit(
            lambda conn: _run_script(conn, registry.record_answer(identity, now, postgres=False)),
            guarded=True,
        )

    async def close_customers(self, now: datetime) -> list[ClosedCustomer]:
        """Freeze the open grains of customers whose grace has passed; mark them closed."""
        return await self._submit(
            lambda conn: _run_script(conn, registry.close_due(now, postgres=False))
        )

    async def batch_refusals(
        self, keys: list[GrainKey], now: datetime
    ) -> list[tuple[int, CustomerRefused]]:
        """Records of a BatchMeterUsage call that must not go to AWS, and why."""
        return await self._reader.submit(
            lambda conn: _run_script(conn, registry.batch_refusals(keys, now))
        )

    async def get_customer(self, customer_id: int) -> CustomerRow | None:
        """One customer, with its latest events (oldest first)."""

        def run(conn: sqlite3.Connection) -> CustomerRow | None:
            rows = _fetch(conn, registry.customer_query(customer_id))
            if not rows:
                return None
            customer = registry.customer_from_row(rows[0])
            events = _fetch(conn, registry.events_query(customer_id))
            customer.events = [registry.event_from_row(r) for r in reversed(events)]
            return customer

        return await self._reader.submit(run)

    async def list_customers(
        self, status: str | None, customer: str | None, after: int | None, limit: int
    ) -> list[CustomerRow]:
        """Customers by status and either id form, by id, after ``after``."""
        query = registry.list_customers_query(status, customer, after, limit)
        rows = await self._reader.submit(lambda conn: _fetch(conn, query))
        return [registry.customer_from_row(row) for row in rows]

    async def customer_counts(self) -> dict[str, int]:
        """Customers by status."""
        rows = await self._reader.submit(lambda conn: _fetch(conn, (registry.COUNTS, ())))
        return registry.counts_from_rows(rows)

    async def check_writable(self) -> None:
        """Raise ``StoreUnavailable`` unless real work could be committed now.

        The path must still name the file opened, a small write must reach the
        disk, the volume must have room to spare, and the last commit of real
        work must not have failed since one succeeded.
        """

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO store_heartbeat (id, at) VALUES (1, ?)",
                (datetime.now(UTC).timestamp(),),
            )

        await self._submit(run, probe=True, guarded=True)
        try:
            free = (await asyncio.to_thread(shutil.disk_usage, self.path.parent)).free
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot tell the free space on the queue's volume ({self.path.parent}): {exc}"
            ) from exc
        if free < MIN_FREE_BYTES:
            raise StoreUnavailable(
                f"only {free} bytes free on the queue's volume ({self.path.parent})"
            )
        if self._commit_error is not None:
            raise StoreUnavailable(f"the last commit failed: {self._commit_error}")

    # -- tables kept beside the queue's (the shared store's spool) ------------

    async def run_write(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """``run`` on the writer connection, in the next group commit, as new usage is:
        its result only once committed, refused once the path names another file. For
        tables another module keeps in this file (``app.queue.spool``)."""
        return await self._submit(run, guarded=True)

    async def run_read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """``run`` on the reader connection, in one read transaction (the last commit)."""
        return await self._reader.submit(run)
