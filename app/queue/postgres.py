"""The shared usage store: one PostgreSQL database for every replica of a SaaS app.

Several sidecars, one per replica, meter the same customers in the same hours.
Summing each replica's share apart would send one record per replica for a
grain, and AWS bills only the first. So they all add to the same grain rows,
and exactly one of them sends each grain:

- **Ingest** is group commit: the calls that wait while a replica's intake
  transaction runs go together into its next one (``_GROUP_CALLS`` calls and
  ``_GROUP_RECORDS`` records at most; a lone call goes at once, alone). The
  transaction reads each grain the group touches once, sums the group's records
  into it in memory, writes it once and inserts every record, then commits once;
  each call is answered only after that commit. Each call's outcome is decided
  on its own, in memory, before anything is written (``_write_group``). The
  grain's row is locked (``FOR UPDATE``) while usage is added, so concurrent
  replicas sum instead of overwriting; a grain that another replica froze
  meanwhile is seen frozen once the lock is granted, and the usage rolls forward
  to the next hour, never into frozen content. An ``IdempotencyKey`` is unique
  across the fleet (a primary key).
- **Freezing** skips grains being added to (``SKIP LOCKED``): they freeze at
  the next cycle, with what was added.
- **Sending**: due grains are *claimed* (``FOR UPDATE SKIP LOCKED``, an owner
  and a lease), so replicas share the work rather than race for it. A
  replica that dies holding claims has them taken over once the lease has
  passed; the frozen payload makes the second sender's request identical, so
  AWS answers it with the same record id instead of billing twice.
- **Customers** (``app.queue.registry``): every change to the registry (an
  event, a ResolveCustomer answer, closing a customer whose grace passed)
  takes the registry's advisory lock exclusively, and every intake takes it
  shared before it reads the customers its records name: a change and an
  intake never interleave, on any replica. An event's id is a primary key,
  inserted in the transaction of its effect: applied once across the fleet.
- **Failures**: a connection that cannot be had, a statement that times out
  or any database error is ``StoreUnavailable``; the transaction is rolled back
  whole, or, when its answer was lost, its outcome is unknown. Intake then puts
  the call's records into the local spool with the same ids
  (``app.queue.spool``), and ``ingest_spooled`` settles them by id: a record
  already in the store is not added again.
- **Every wait is bounded on our side**: a connection is opened within
  ``connect_timeout``, TCP keepalives find a peer that went away while a
  connection idles, each call (waiting for a connection, its statements, the
  commit's answer) is given up after the store deadline however the server
  behaves, and the server ends a statement, a lock wait or a transaction left
  idle (a replica stalled mid-transaction) after its own timeouts, so that no
  replica holds grains the fleet needs.

The driver is psycopg 3 with its async pool (docs/shared-store.md says why).
Statements are those of ``app.queue.queries``, shared with the SQLite store.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import socket
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

import psycopg
from psycopg import AsyncConnection, errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from app.metering.billing import utc_now
from app.metering.grains import (
    GrainKey,
    frozen_payload,
)
from app.metering.subscriptions import SubscriptionEvent
from app.queue import fleet, queries, registry
from app.queue.migrations import POSTGRES_MIGRATIONS
from app.queue.plan import GrainRowData, GroupPlacement, IntakePlan, place_calls
from app.queue.queries import GRAIN_COLUMNS, grain_from_row
from app.queue.records import Filters
from app.queue.registry import (
    ClosedCustomer,
    CustomerRefused,
    CustomerRow,
    EventOutcome,
    Identity,
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
from app.runtime.redaction import redact

log = logging.getLogger("app.queue.store")
T = TypeVar("T")
Conn = AsyncConnection[tuple[Any, ...]]

# Serializes schema migrations across replicas starting together.
_MIGRATION_LOCK = 7_201_465_312_118_301
# A transaction that lost a deadlock or a serialization race is run again.
_TRANSACTION_TRIES = 3
# TCP keepalives on every connection: an idle pooled connection whose peer went away
# (a failover, a partition) is found dead after about idle + interval x count seconds
# rather than at its next use, hours later; libpq's own defaults leave it to the
# operating system's (two hours).
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
# Data sent and not acknowledged for this long ends the connection (a peer cut off
# mid-call); the store deadline has given up on the call long before.
TCP_USER_TIMEOUT_MS = 30_000
# Migrations may read every unsettled grain: they get more time than a call.
_MIGRATION_DEADLINE = 60.0
# Group commit: the calls, and their records, one intake transaction takes at most (a
# call of more records than that goes alone), and how many such transactions one
# replica runs at once. One at a time gathers the most: the calls that arrive while
# it commits all go into the next, and a hot grain is locked once per group rather
# than once per call.
_GROUP_CALLS = 256
_GROUP_RECORDS = 1000
_GROUP_WRITERS = 1


class DeadlinePassed(Exception):
    """A call to the store was given up: no answer within the store deadline."""


# What one intake call gets back: an outcome per record (``None``: a spooled record the
# store had already), or why it failed (``IntakeRefused``: an all-or-nothing call
# refused; ``StoreUnavailable``).
CallResult = list[Receipt | IntakeFailure | None] | Exception
# Errors a value of one call may cause (PostgreSQL refuses a text with a NUL, say):
# a group failing with one is written again call by call.
_DATA_FAULTS = (psycopg.DataError, psycopg.IntegrityError)


@dataclass(slots=True, eq=False)
class _Call:
    """One intake call waiting for (or in) a group's transaction."""

    intakes: list[Intake]
    all_or_nothing: bool
    # From the spool: records whose id the store has already are settled as such.
    spooled: bool
    # Loop time by which the call is answered (the store deadline from its arrival).
    end: float
    future: asyncio.Future[list[Receipt | IntakeFailure | None]]


def _sql(statement: str) -> bytes:
    # psycopg's placeholder style; bytes, since the statements are trusted constants.
    return queries.to_format_style(statement).encode()


class PostgresStore:
    """``UsageStore`` on a PostgreSQL database shared by every replica."""

    def __init__(
        self,
        dsn: str,
        policy: GrainPolicy,
        *,
        pool_size: int,
        statement_timeout: float,
        claim_lease: float,
        owner: str | None = None,
        connect_timeout: float = 3.0,
        deadline: float = 10.0,
        idle_transaction_timeout: float = 10.0,
        fleet_settings: dict[str, str] | None = None,
        password: Callable[[], str] | None = None,
    ) -> None:
        self.policy = policy
        self.commits = 0
        self.scope = "fleet"
        self.owner = owner or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._dsn = dsn
        self._pool_size = pool_size
        self._timeout = statement_timeout
        self._connect_timeout = connect_timeout
        self._deadline = deadline
        self._idle_timeout = idle_transaction_timeout
        # The settings that shape grains, checked against the fleet's at each open
        # (app.queue.fleet); None: not checked (the fleet-settings command).
        self._fleet_settings = fleet_settings
        # RDS IAM authentication: a fresh token per new connection (app.aws.rds_auth).
        self._password = password
        self._lease = timedelta(seconds=claim_lease)
        self._pool: AsyncConnectionPool[Conn] | None = None
        # Why the store last failed and since when; None once it answered again.
        self._problem: str | None = "not opened yet"
        self._problem_since: datetime | None = None
        # Calls given up at their deadline, still unwinding (psycopg cancels the query
        # and closes the connection): kept so that they are not garbage collected.
        self._abandoned: set[asyncio.Task[Any]] = set()
        # Group commit: intake calls not taken into a transaction yet, and the tasks
        # writing groups (``_GROUP_WRITERS`` at most; none while nothing waits).
        self._calls: deque[_Call] = deque()
        self._writers: set[asyncio.Task[None]] = set()

    # -- plumbing ---------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Whether ``open`` has succeeded (the schema is migrated)."""
        return self._pool is not None

    @property
    def problem(self) -> tuple[str, datetime | None] | None:
        """Why the store could not be used last, and since when; ``None`` while it answers.

        Every call updates it: the intake asks it before waiting on a store known to be
        down, and ``/readyz`` reports it without a call of its own.
        """
        return None if self._problem is None else (self._problem, self._problem_since)

    def connection_kwargs(self) -> dict[str, Any]:
        """What every new connection is opened with, on top of the DSN: the client-side
        bounds (connect timeout, keepalives) and the server-side ones, per session."""
        statement_ms = max(1, int(self._timeout * 1000))
        idle_ms = max(1, int(self._idle_timeout * 1000))
        return {
            "application_name": "metering-sidecar",
            "options": (
                f"-c statement_timeout={statement_ms} -c lock_timeout={statement_ms} "
                f"-c idle_in_transaction_session_timeout={idle_ms}"
            ),
            # libpq counts whole seconds and takes 2 at least.
            "connect_timeout": max(2, math.ceil(self._connect_timeout)),
            **KEEPALIVES,
            "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
        }

    def _new_pool(self) -> AsyncConnectionPool[Conn]:
        """The connection pool: the one place connections are made (and configured)."""
        return AsyncConnectionPool(
            self._dsn,
            min_size=1,
            max_size=self._pool_size,
            open=False,
            # The call's own deadline (``_run``) gives up first.
            timeout=self._deadline,
            # With a password provider (RDS IAM authentication) every new connection is
            # opened with a fresh token: psycopg_pool calls this for each.
            kwargs=self.connection_kwargs() if self._password is None else self._password_kwargs,
            name="usage-store",
        )

    async def open(self, *, at_start: bool = False) -> None:
        """Connect, migrate under an advisory lock; raise ``StoreUnavailable`` if not, within
        the connect timeout and the store deadline. May be called again after a failure.

        At the sidecar's start (``at_start``) the wait for the first connection is one
        attempt's (libpq's connect timeout) and a second: a database that is down or does
        not answer holds the start, and so the seller's app, no longer than that; usage goes
        to the local spool and the spool's loop opens the store when it answers."""
        await self.close(budget=1.0)
        pool = self._new_pool()
        attempt = float(max(2, math.ceil(self._connect_timeout)))
        wait = attempt + 1.0 if at_start else attempt + self._deadline
        try:
            await pool.open(wait=True, timeout=wait)
            await self._run(
                self._migrate, deadline=max(self._deadline, _MIGRATION_DEADLINE), pool=pool
            )
            # Calls use the pool only once the schema is there.
            self._pool = pool
        except fleet.FleetSettingsConflict as exc:
            # A configuration error, not an outage: said whole, never retried as one.
            await pool.close(timeout=1.0)
            self._failed(str(exc))
            raise
        except (PoolTimeout, psycopg.Error, StoreUnavailable) as exc:
            await pool.close(timeout=1.0)
            failure = StoreUnavailable(f"cannot open the shared usage queue: {_describe(exc)}")
            self._failed(str(failure))
            raise failure from exc

    def _password_kwargs(self) -> dict[str, Any]:
        """``connection_kwargs`` with a password from the provider, for one new connection."""
        assert self._password is not None
        try:
            password = self._password()
        except Exception as exc:
            # No credentials to sign a token with, say: this connection fails like any
            # other that cannot be made, and the pool tries again.
            raise psycopg.OperationalError(f"no password for a new connection: {exc}") from exc
        return {**self.connection_kwargs(), "password": password}

    async def run_fleet(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """``work``, statements of ``app.queue.fleet`` (a slot of the account's request
        quota, the database's clock), on a pooled connection in autocommit: one round trip
        each, no transaction around them. Within the store deadline; faults, a passed
        deadline and a store known to be down (it fails at once: a send must not wait on
        it) are ``StoreUnavailable``."""
        pool = self._pool
        if pool is None or self._problem is not None:
            raise StoreUnavailable(f"the shared usage queue cannot be used: {self._problem}")
        end = asyncio.get_running_loop().time() + self._deadline
        try:
            result = await self._within(end, _autocommit(pool, work))
        except (PoolTimeout, psycopg.Error, OSError, DeadlinePassed) as exc:
            raise self._unavailable(exc) from exc
        self._answered()
        return result

    async def close(self, budget: float = 5.0) -> None:
        """Close the pool, waiting ``budget`` seconds at most for connections in use (and
        intake transactions under way); calls given up at their deadline are not waited
        for. Intake calls still waiting are answered ``StoreUnavailable``."""
        for task in list(self._abandoned):
            task.cancel()
        if self._writers:
            loop = asyncio.get_running_loop()
            end = loop.time() + max(budget, 0.1)
            _, left = await asyncio.wait(set(self._writers), timeout=max(budget, 0.1))
            for writer in left:
                # Its calls are answered StoreUnavailable as it unwinds.
                writer.cancel()
            if left:
                await asyncio.wait(left, timeout=0.5)
            budget = max(0.1, end - loop.time())
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close(timeout=max(budget, 0.1))

    async def _migrate(self, conn: Conn) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
        )
        cursor = await conn.execute("SELECT version FROM schema_migrations")
        done = {version for (version,) in await cursor.fetchall()}
        for version, script in POSTGRES_MIGRATIONS:
            if version in done:
                continue
            for statement in script:
                await conn.execute(statement.encode())
            await conn.execute(
                "INSERT INTO schema_migrations VALUES (%s, EXTRACT(EPOCH FROM now()))",
                (version,),
            )
            log.info("queue schema migrated", extra={"version": version, "engine": "postgresql"})
        # Deadlines follow the windows in force, for grains already queued too.
        cursor = await conn.execute(_sql(queries.UNSETTLED + " FOR UPDATE OF g"))
        grains = [grain_from_row(row) for row in await cursor.fetchall()]
        changed = queries.changed_deadlines(grains, self.policy)
        if changed:
            async with conn.cursor() as cur:
                await cur.executemany(
                    _sql(queries.SET_DEADLINE), [(deadline, gid) for gid, deadline in changed]
                )
        if self._fleet_settings is not None:
            # Under the migration lock: the first replica writes the fleet's grain rules,
            # every other one must match them.
            await fleet.settle_settings(conn, self._fleet_settings, self.owner)

    async def _run(
        self,
        work: Callable[[Conn], Awaitable[T]],
        *,
        writes: bool = True,
        deadline: float | None = None,
        pool: AsyncConnectionPool[Conn] | None = None,
    ) -> T:
        """``work`` in one transaction, retried after a deadlock, all of it within the
        store deadline; database faults and a passed deadline become ``StoreUnavailable``.
        The sidecar's own exceptions pass through (rolled back)."""
        pool = pool or self._pool
        if pool is None:
            raise StoreUnavailable(
                f"the shared usage queue is not open: {self._problem or 'closed'}"
            )
        loop = asyncio.get_running_loop()
        end = loop.time() + (deadline or self._deadline)
        for attempt in range(1, _TRANSACTION_TRIES + 1):
            try:
                result = await self._within(end, _transaction(pool, work))
            except (
                errors.DeadlockDetected,
                errors.SerializationFailure,
                # Another replica took one of the call's IdempotencyKeys (or, for a
                # spooled record, its id) meanwhile: run again, and it is seen.
                errors.UniqueViolation,
            ) as exc:
                if attempt == _TRANSACTION_TRIES:
                    raise self._unavailable(exc) from exc
                continue
            except (PoolTimeout, psycopg.Error, OSError, DeadlinePassed) as exc:
                raise self._unavailable(exc) from exc
            if writes:
                self.commits += 1
            self._answered()
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _within(self, end: float, call: Coroutine[Any, Any, T]) -> T:
        """``call``'s result, or ``DeadlinePassed`` at ``end`` (loop time).

        The call runs as a task of its own, and a call past its deadline is cancelled
        and left to unwind in the background: psycopg answers a cancellation by asking
        the server to cancel the query and waiting for it, and a stopped server answers
        neither, so waiting for the unwinding would hold the caller up to 10 s more.
        Whether such a call committed is unknown: intake settles it by record id.
        """
        task = asyncio.ensure_future(call)
        try:
            done, _ = await asyncio.wait(
                {task}, timeout=max(0.0, end - asyncio.get_running_loop().time())
            )
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if task in done:
            return task.result()
        self._abandon(task)
        raise DeadlinePassed(
            f"no answer within the store deadline ({self._deadline:g} s); the database may "
            "be stopped, overloaded or cut off"
        )

    def _abandon(self, task: asyncio.Task[Any]) -> None:
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(self._unwound)

    def _unwound(self, task: asyncio.Task[Any]) -> None:
        # A call given up at its deadline has ended; what it raised was answered already.
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        detail = _describe(exc)
        self._failed(detail)
        return StoreUnavailable(f"the shared usage queue failed: {detail}")

    def _failed(self, detail: str) -> None:
        """The store failed a call: said once per outage at error level, then quietly
        (the spool's and the dispatcher's own lines say what waits meanwhile)."""
        if self._problem is None or self._problem_since is None:
            log.error("shared usage queue failed", extra={"error": detail})
            self._problem_since = utc_now()
        else:
            log.info("shared usage queue still failing", extra={"error": detail})
        self._problem = detail

    def _answered(self) -> None:
        if self._problem is not None and self._problem_since is not None:
            log.warning(
                "shared usage queue answers again",
                extra={"since": self._problem_since.isoformat(), "error": self._problem},
            )
        self._problem = None
        self._problem_since = None

    # -- intake -----------------------------------------------------------

    async def ingest(
        self, intakes: list[Intake], *, all_or_nothing: bool
    ) -> list[Receipt | IntakeFailure]:
        """Add a call's records to their grains, in the next group's transaction (see
        ``_write_group``): answered once it has committed."""
        # A StoreUnavailable may hide a commit whose answer was lost: the caller
        # spools the records with these same ids, and ``ingest_spooled`` settles them.
        outcomes = await self._gathered(intakes, all_or_nothing=all_or_nothing, spooled=False)
        placed = [outcome for outcome in outcomes if outcome is not None]
        assert len(placed) == len(outcomes)
        return placed

    async def ingest_spooled(self, intakes: list[Intake]) -> list[Receipt | IntakeFailure | None]:
        """Add records from the spool (``app.queue.spool``), in order, each on its own:
        ``None`` for a record whose id the store has already (a call whose commit's answer
        was lost did commit), a ``Receipt`` for one added (``replayed`` when its
        IdempotencyKey was seen: nothing counted), an ``IntakeFailure`` for one the
        registry, the key's earlier content or AWS's limits refuse. One transaction (a
        group's, as any intake call)."""
        return await self._gathered(intakes, all_or_nothing=False, spooled=True)

    async def _gathered(
        self, intakes: list[Intake], *, all_or_nothing: bool, spooled: bool
    ) -> list[Receipt | IntakeFailure | None]:
        """Queue one call for the next group's transaction and wait for its outcome."""
        loop = asyncio.get_running_loop()
        call = _Call(
            intakes, all_or_nothing, spooled, loop.time() + self._deadline, loop.create_future()
        )
        self._calls.append(call)
        if len(self._writers) < _GROUP_WRITERS:
            writer = asyncio.ensure_future(self._write_calls())
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        # Cancelled before its group is taken, the call is left out of it.
        return await call.future

    async def _write_calls(self) -> None:
        """Write groups of the calls waiting, one transaction each, until none waits.

        No timer: a group is what has queued up by the time the previous one is done
        (a lone call goes at once, alone)."""
        group: list[_Call] = []
        try:
            while self._calls:
                group = self._take_group()
                await self._commit_group(group)
                group = []
        finally:
            # Cancelled (the store closed past its budget): nobody is left waiting.
            closed = StoreUnavailable("the shared usage queue is closed")
            for call in group:
                _answer(call, closed)
            if group:
                while self._calls:
                    _answer(self._calls.popleft(), closed)
            # Now, not in a done callback: a call queued from here on starts a writer.
            task = asyncio.current_task()
            if task is not None:
                self._writers.discard(task)

    def _take_group(self) -> list[_Call]:
        """The oldest waiting calls, up to the group's bounds (at least one call)."""
        group: list[_Call] = []
        records = 0
        while self._calls and len(group) < _GROUP_CALLS:
            call = self._calls[0]
            if call.future.done():
                self._calls.popleft()
                continue
            if group and records + len(call.intakes) > _GROUP_RECORDS:
                break
            group.append(self._calls.popleft())
            records += len(call.intakes)
        return group

    async def _commit_group(self, group: list[_Call]) -> None:
        """One transaction for ``group``; every call answered after it, the same failure
        for each if it failed. A failure that may come from one call's data (a value the
        database refuses) is not the others': they are written again one by one."""
        now = asyncio.get_running_loop().time()
        late = [call for call in group if call.end <= now]
        if late:
            # Waited for a transaction past its deadline: the store is not keeping up.
            failure = self._unavailable(
                DeadlinePassed(
                    f"no transaction within the store deadline ({self._deadline:g} s); the "
                    "database may be overloaded"
                )
            )
            for call in late:
                _answer(call, failure)
            group = [call for call in group if call.end > now]
            if not group:
                return
        try:
            results = await self._run(
                lambda conn: self._write_group(conn, group),
                deadline=min(call.end for call in group) - now,
            )
        except StoreUnavailable as exc:
            if len(group) > 1 and isinstance(exc.__cause__, _DATA_FAULTS):
                log.warning(
                    "an intake group failed on a value; its calls are written one by one",
                    extra={"calls": len(group), "error": str(exc)},
                )
                for call in group:
                    await self._commit_group([call])
                return
            for call in group:
                _answer(call, exc)
            return
        except Exception as exc:
            # Not the database's: a fault of the sidecar's own, answered to every call.
            log.exception("intake group failed")
            for call in group:
                _answer(call, exc)
            return
        for call, result in zip(group, results, strict=True):
            _answer(call, result)

    async def _write_group(self, conn: Conn, calls: list[_Call]) -> list[CallResult]:
        """The group's records, read, placed and written in this transaction.

        One plan for the whole group (``app.queue.plan.place_calls``, as the SQLite
        store's): each grain the group touches is locked and read once, summed in memory
        and written once; records and keys go in one batch each; every outcome is
        decided in memory before anything is written, an all-or-nothing call with a
        failure left out whole. Run again whole by ``_run`` after a deadlock."""
        spooled = [i.record_id for call in calls if call.spooled for i in call.intakes]
        stored_ids: set[str] = set()
        if spooled:
            cursor = await conn.execute(
                "SELECT id FROM usage_records WHERE id = ANY(%s)", (spooled,)
            )
            stored_ids = {str(row[0]) for row in await cursor.fetchall()}
        fresh = [
            [i for i in call.intakes if i.record_id not in stored_ids]
            if call.spooled
            else call.intakes
            for call in calls
        ]
        # The customers the records name, under the registry lock (shared): no
        # registry change commits until this group does, and none is half seen.
        customers = await _drive(
            conn,
            registry.intake_index((i.usage.key for f in fresh for i in f), postgres=True),
        )
        reads = _GroupReads(conn)
        live = [n for n, call in enumerate(calls) if not call.future.done()]
        script = place_calls(
            [(fresh[n], call.all_or_nothing) for n, call in enumerate(calls)],
            live,
            self.policy,
            customers,
        )
        plan = next(script)
        while True:
            await reads.prepare(plan)
            try:
                plan = script.send(reads.seen)
            except StopIteration as stop:
                placement: GroupPlacement = stop.value
                break
        await _write_plan(conn, placement.plan)
        outcomes = placement.plan.outcomes()
        results: list[CallResult] = []
        for n, call in enumerate(calls):
            outcome = placement.outcome(n, len(fresh[n]), outcomes)
            if outcome is None:
                # Its caller left before the group was read: nothing of it written.
                results.append(StoreUnavailable("the call was cancelled"))
            elif isinstance(outcome, IntakeRefused):
                results.append(outcome)
            else:
                own = iter(outcome)
                results.append(
                    [None if i.record_id in stored_ids else next(own) for i in call.intakes]
                )
        return results

    # -- sending ----------------------------------------------------------

    async def freeze_due(self, now: datetime, *, everything: bool = False) -> int:
        """Freeze due (or all) open grains no other transaction is adding to."""

        async def work(conn: Conn) -> int:
            query = f"SELECT {GRAIN_COLUMNS} FROM grains g WHERE g.status = 'open'"
            params: tuple[object, ...] = ()
            if not everything:
                query += " AND g.due_at <= ?"
                params = (now.timestamp(),)
            cursor = await conn.execute(
                _sql(query + " ORDER BY g.id FOR UPDATE OF g SKIP LOCKED"), params
            )
            grains = [grain_from_row(row) for row in await cursor.fetchall()]
            if grains:
                async with conn.cursor() as cur:
                    await cur.executemany(
                        _sql(queries.FREEZE),
                        [
                            (
                                frozen_payload(g.key, g.content, str(uuid.uuid4())),
                                now.timestamp(),
                                now.timestamp(),
                                g.id,
                            )
                            for g in grains
                        ],
                    )
            return len(grains)

        return await self._run(work)

    def _unclaimed(self) -> str:
        return " AND (g.claimed_by IS NULL OR g.claim_expires_at <= ?)"

    async def expire_overdue(self, now: datetime) -> list[GrainRow]:
        """Unsent grains past their deadline end ``expired``; not one a replica is sending."""

        async def work(conn: Conn) -> list[GrainRow]:
            cursor = await conn.execute(
                _sql(
                    queries.UNSETTLED
                    + " AND g.deadline <= ?"
                    + self._unclaimed()
                    + " FOR UPDATE OF g SKIP LOCKED"
                ),
                (now.timestamp(), now.timestamp()),
            )
            grains = [grain_from_row(row) for row in await cursor.fetchall()]
            if grains:
                async with conn.cursor() as cur:
                    await cur.executemany(
                        _sql(queries.EXPIRE), [(now.timestamp(), g.id) for g in grains]
                    )
            return grains

        return await self._run(work)

    async def sendable(
        self, now: datetime, limit: int, *, ignore_backoff: bool = False
    ) -> list[GrainRow]:
        """Claim frozen grains due for an attempt, oldest hour first, for this replica."""

        async def work(conn: Conn) -> list[GrainRow]:
            where = "g.status = 'frozen'" + self._unclaimed()
            params: list[object] = [now.timestamp()]
            if not ignore_backoff:
                where += " AND g.next_attempt_at <= ?"
                params.append(now.timestamp())
            cursor = await conn.execute(
                _sql(
                    f"SELECT g.id FROM grains g WHERE {where} "
                    "ORDER BY g.hour, g.id LIMIT ? FOR UPDATE OF g SKIP LOCKED"
                ),
                (*params, limit),
            )
            ids = [int(gid) for (gid,) in await cursor.fetchall()]
            if not ids:
                return []
            await conn.execute(
                "UPDATE grains SET claimed_by = %s, claim_expires_at = %s WHERE id = ANY(%s)",
                (self.owner, (now + self._lease).timestamp(), ids),
            )
            cursor = await conn.execute(
                _sql(f"SELECT {GRAIN_COLUMNS} FROM grains g WHERE g.id = ANY(?) ")
                + b"ORDER BY g.hour, g.id",
                (ids,),
            )
            return [grain_from_row(row) for row in await cursor.fetchall()]

        return await self._run(work)

    async def extend_claims(self, grain_ids: list[int], now: datetime) -> None:
        """Keep this replica's claims on grains it is still sending for another lease from
        ``now`` (the fleet's clock): sending a page may outlast one lease when the
        account's quota paces it, and another replica must not take those grains over."""

        async def work(conn: Conn) -> None:
            await conn.execute(
                "UPDATE grains SET claim_expires_at = %s WHERE id = ANY(%s) AND claimed_by = %s",
                ((now + self._lease).timestamp(), grain_ids, self.owner),
            )

        await self._run(work, writes=False)

    async def settle(self, outcomes: list[Outcome], now: datetime) -> None:
        """Record outcomes and release the claims, in one transaction."""

        async def work(conn: Conn) -> None:
            async with conn.cursor() as cur:
                for statement, params in queries.settle_statements(outcomes, now):
                    await cur.execute(_sql(statement), params)
                await cur.execute(
                    "UPDATE grains SET claimed_by = NULL, claim_expires_at = NULL "
                    "WHERE id = ANY(%s) AND claimed_by = %s",
                    ([o.grain_id for o in outcomes], self.owner),
                )

        await self._run(work)

    # -- reading ----------------------------------------------------------

    async def _fetch(self, query: queries.Query) -> list[tuple[Any, ...]]:
        statement, params = query

        async def work(conn: Conn) -> list[tuple[Any, ...]]:
            cursor = await conn.execute(_sql(statement), params)
            return await cursor.fetchall()

        return await self._run(work, writes=False)

    async def get_record(self, record_id: str) -> RecordRow | None:
        """One record and its grain."""
        rows = await self._fetch(queries.record_query(record_id))
        return queries.record_from_row(rows[0]) if rows else None

    async def list_records(
        self, filters: Filters, after: str | None, limit: int
    ) -> list[RecordRow]:
        """Records matching ``filters``, by id, after ``after``."""
        rows = await self._fetch(queries.list_records_query(filters, after, limit))
        return [queries.record_from_row(row) for row in rows]

    async def get_grain(self, grain_id: int) -> GrainRow | None:
        """One grain."""
        rows = await self._fetch(queries.grain_query(grain_id))
        return grain_from_row(rows[0]) if rows else None

    async def list_grains(self, filters: Filters, after: int | None, limit: int) -> list[GrainRow]:
        """Grains matching ``filters``, by id, after ``after``."""
        rows = await self._fetch(queries.list_grains_query(filters, after, limit))
        return [grain_from_row(row) for row in rows]

    async def stats(self, now: datetime) -> QueueStats:
        """Fleet-wide counts and ages: every replica sees the same."""

        async def work(conn: Conn) -> QueueStats:
            rows = []
            for statement, params in (
                (queries.PENDING_RECORDS, ()),
                (queries.OPEN_GRAINS, (now.timestamp(),)),
                (queries.FROZEN_GRAINS, ()),
            ):
                cursor = await conn.execute(_sql(statement), params)
                row = await cursor.fetchone()
                assert row is not None
                rows.append(row)
            return queries.stats_from_rows(*rows)

        return await self._run(work, writes=False)

    async def next_wakeup(self) -> datetime | None:
        """When any replica has something to do next."""
        (row,) = await self._fetch((queries.NEXT_WAKEUP, ()))
        return queries.wakeup_from_row(row)

    async def prune(self, before: datetime, keys_before: datetime) -> int:
        """Forget grains settled before ``before`` (keys received before ``keys_before``)."""

        async def work(conn: Conn) -> int:
            await conn.execute(_sql(queries.PRUNE_KEEP_OUTCOMES), (before.timestamp(),))
            cursor = await conn.execute(_sql(queries.PRUNE_GRAINS), (before.timestamp(),))
            await conn.execute(_sql(queries.PRUNE_KEYS), (keys_before.timestamp(),))
            return cursor.rowcount

        return await self._run(work)

    # -- the customer registry ----------------------------------------------

    async def apply_event(
        self, event: SubscriptionEvent, now: datetime, grace: timedelta
    ) -> EventOutcome:
        """Apply a subscription event once across the fleet: its id and its effect in
        one transaction, under the registry lock."""
        return await self._run(
            lambda conn: _drive(conn, registry.apply_event(event, now, grace, postgres=True))
        )

    async def record_customer(self, identity: Identity, now: datetime) -> CustomerRow:
        """Register a ResolveCustomer answer."""
        return await self._run(
            lambda conn: _drive(conn, registry.record_answer(identity, now, postgres=True))
        )

    async def close_customers(self, now: datetime) -> list[ClosedCustomer]:
        """Freeze the open grains of customers whose grace has passed, once across the
        fleet (the registry lock); the replicas' claims then share the sending."""
        return await self._run(lambda conn: _drive(conn, registry.close_due(now, postgres=True)))

    async def batch_refusals(
        self, keys: list[GrainKey], now: datetime
    ) -> list[tuple[int, CustomerRefused]]:
        """Records of a BatchMeterUsage call that must not go to AWS, and why."""
        return await self._run(
            lambda conn: _drive(conn, registry.batch_refusals(keys, now)), writes=False
        )

    async def get_customer(self, customer_id: int) -> CustomerRow | None:
        """One customer, with its latest events (oldest first)."""

        async def work(conn: Conn) -> CustomerRow | None:
            rows = await _rows(conn, registry.customer_query(customer_id))
            if not rows:
                return None
            customer = registry.customer_from_row(rows[0])
            events = await _rows(conn, registry.events_query(customer_id))
            customer.events = [registry.event_from_row(r) for r in reversed(events)]
            return customer

        return await self._run(work, writes=False)

    async def list_customers(
        self, status: str | None, customer: str | None, after: int | None, limit: int
    ) -> list[CustomerRow]:
        """Customers by status and either id form, by id, after ``after``."""
        rows = await self._fetch(registry.list_customers_query(status, customer, after, limit))
        return [registry.customer_from_row(row) for row in rows]

    async def customer_counts(self) -> dict[str, int]:
        """Customers by status, fleet-wide."""
        return registry.counts_from_rows(await self._fetch((registry.COUNTS, ())))

    async def check_writable(self) -> None:
        """Raise ``StoreUnavailable`` unless the database answers and takes writes.

        ``txid_current()`` makes the probe a writing transaction: a standby (a
        failover in progress, a read replica) refuses it.
        """

        async def work(conn: Conn) -> None:
            await conn.execute("SELECT txid_current()")

        await self._run(work, writes=False)


async def _transaction(pool: AsyncConnectionPool[Conn], work: Callable[[Conn], Awaitable[T]]) -> T:
    """``work`` on a pooled connection, in one transaction."""
    async with pool.connection() as conn, conn.transaction():
        return await work(conn)


async def _autocommit(pool: AsyncConnectionPool[Conn], work: Callable[[Conn], Awaitable[T]]) -> T:
    """``work`` on a pooled connection in autocommit (given back as it was lent)."""
    async with pool.connection() as conn:
        await conn.set_autocommit(True)
        try:
            return await work(conn)
        finally:
            await conn.set_autocommit(False)


async def _rows(conn: Conn, query: queries.Query) -> list[tuple[Any, ...]]:
    """The rows of one statement (none for a statement that returns none)."""
    cursor = await conn.execute(_sql(query[0]), query[1])
    return await cursor.fetchall() if cursor.description is not None else []


async def _drive(conn: Conn, script: registry.Script[T]) -> T:
    """A registry script on ``conn``, in its transaction."""
    try:
        statement = next(script)
        while True:
            statement = script.send(await _rows(conn, statement))
    except StopIteration as stop:
        result: T = stop.value
        return result


async def _grains_for_update(
    conn: Conn, keys: list[GrainKey]
) -> dict[GrainKey, GrainRowData | None]:
    """The rows of ``keys``' grains, the open ones locked while the call adds to them (a
    replica freezing them meanwhile skips them). Frozen ones are not locked: their
    usage rolls forward, and a replica settling them must not wait for this call."""
    found: dict[GrainKey, GrainRowData | None] = dict.fromkeys(keys)
    for statement, params in queries.grains_for_keys(keys):
        cursor = await conn.execute(_sql(statement), params)
        for row in await cursor.fetchall():
            found[queries.grain_key_of(row)] = (int(row[7]), row[8], row[9])
    open_ids = sorted(row[0] for row in found.values() if row is not None and row[1] == "open")
    if open_ids:
        cursor = await conn.execute(
            "SELECT id, status, content FROM grains WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
            (open_ids,),
        )
        locked: dict[int, GrainRowData] = {
            int(r[0]): (int(r[0]), str(r[1]), str(r[2])) for r in await cursor.fetchall()
        }
        for key, current in found.items():
            if current is not None and current[0] in locked:
                found[key] = locked[current[0]]
    return found


class _GroupReads:
    """What a group's transaction has read, kept while its calls are placed (again, after
    an all-or-nothing call was left out): each grain locked and read once, each
    IdempotencyKey looked up once."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn
        self._locked: set[int] = set()
        self._rows: dict[GrainKey, GrainRowData | None] = {}
        self._looked_up: set[str] = set()
        # The keys seen before, as ``IntakePlan.place`` takes them.
        self.seen: dict[str, tuple[Any, ...]] = {}

    async def prepare(self, plan: IntakePlan) -> None:
        """Give ``plan`` the rows and keys it needs, reading only what is not read yet."""
        plan.provide(self._rows)
        # Concurrent groups take their grains (and the twins of their customers'
        # other forms) in one global order, all at once: no deadlocks.
        await self._lock(plan.first_keys())
        while keys := plan.missing():
            # Rolled forward past a frozen grain: the next hour's, locked in turn.
            await self._lock(keys)
            found = await _grains_for_update(self._conn, keys)
            self._rows.update(found)
            plan.provide(found)
        unread = [k for k in dict.fromkeys(plan.keys()) if k not in self._looked_up]
        for statement, params in queries.seen_keys(unread):
            cursor = await self._conn.execute(_sql(statement), params)
            self.seen.update((row[0], tuple(row[1:])) for row in await cursor.fetchall())
        self._looked_up.update(unread)

    async def _lock(self, keys: list[GrainKey]) -> None:
        """Take the transaction's advisory locks on grain keys, in ascending order, so that
        groups adding to the same grains (from any replica) queue up instead of
        deadlocking."""
        ids = sorted({_lock_id(key) for key in keys} - self._locked)
        if ids:
            async with self._conn.cursor() as cursor:
                await cursor.executemany("SELECT pg_advisory_xact_lock(%s)", [(i,) for i in ids])
            self._locked.update(ids)


async def _write_plan(conn: Conn, plan: IntakePlan) -> None:
    """Write what ``plan`` placed: new grains (in key order), each changed grain once (in
    id order: their rows are locked already), the records and the keys in one batch each."""
    new = sorted(plan.new_grains(), key=lambda item: queries.key_params(item[0].key))
    by_key = {queries.key_params(grain.key): grain for grain, _ in new}
    for statement, params in queries.insert_grains([values for _, values in new]):
        cursor = await conn.execute(_sql(statement), params)
        for row in await cursor.fetchall():
            by_key[tuple(row[:7])].id = int(row[7])
    updates = sorted(plan.grain_updates(), key=lambda row: cast(int, row[-1]))
    async with conn.cursor() as cursor:
        for statement, rows in (
            (queries.UPDATE_GRAIN, updates),
            (queries.INSERT_RECORD, plan.record_rows()),
            (queries.INSERT_KEY, plan.key_rows()),
        ):
            if rows:
                await cursor.executemany(_sql(statement), rows)


def _answer(call: _Call, result: CallResult) -> None:
    """Resolve a call's future (not one its caller cancelled); a failure shared by a
    group is raised to each call as its own exception."""
    if call.future.done():
        return
    if isinstance(result, StoreUnavailable):
        own = StoreUnavailable(*result.args)
        own.__cause__ = result.__cause__
        call.future.set_exception(own)
    elif isinstance(result, BaseException):
        call.future.set_exception(result)
    else:
        call.future.set_result(result)


def _lock_id(key: GrainKey) -> int:
    text = "\x1f".join(str(part) for part in queries.key_params(key))
    return int.from_bytes(
        hashlib.blake2b(text.encode(), digest_size=8).digest(), "big", signed=True
    )


def _describe(exc: BaseException) -> str:
    """A database error in one line, without the DSN or its password (psycopg quotes the
    part of a DSN it cannot parse, which may be the password)."""
    text = redact(str(exc).strip().splitlines()[0]) if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
