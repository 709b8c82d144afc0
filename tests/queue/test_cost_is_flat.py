"""Cost grows with the work, not with history (#19, part 5).

The same work is done on a store holding 100 records and on one holding 100,000 (all but
25 of them history: grains sent hours ago, most accepted, some rejected or expired), on
both stores, and the work the database does is counted with its own counters, never
timed:

- SQLite: statements run (``set_trace_callback``: each statement executed, each row of
  an ``executemany`` too) and virtual-machine instructions (``set_progress_handler``
  every instruction), on every connection the store opens (its ``on_connect`` hook: the
  writer's and the reader's), only while the operation runs.
- PostgreSQL: statements sent (each ``execute``, each row of an ``executemany``), rows
  visited (``seq_tup_read`` and ``idx_tup_fetch`` of the store's tables, ``idx_tup_read``
  of their indexes: an index-only scan fetches no table row) and blocks read (the tables'
  and indexes' ``pg_statio_user_tables`` figures, cached or not: a search on an index
  whose first column it does not constrain reads the whole index yet returns only what
  matches, so only the blocks show it). The store works on a pool of one connection,
  whose backend flushes its statistics (``pg_stat_force_next_flush``) before and after
  the operation; they are read on another connection.

The work: intake (a call of one record, a call of 100); the listings of
``GET /v1/usage-records`` and ``GET /v1/usage-grains`` (first pages and the next by
cursor, by status, by customer, by hour); a dispatcher cycle (closing customers,
freezing due grains, expiring, claiming and sending what is due to a backend that takes
it at once, settling, pruning, the figures) and its next wake-up; the figures the
metrics show (``stats``, ``customer_counts``); opening a SQLite store (a start). Both
stores hold the same pending usage, so each operation does the same work on both; only
the history differs: the records, and the customer registry, which holds customers with
history (20 in the small store, 400 in the large one; counting them by status read each
of them until the counts were kept by triggers).

The history goes in through the store's own intake (``ingest``, calls of 1,000): one
customer's day as the API's intake checks it, repeated for every customer with the
customer swapped (checking 100,000 records one by one would take most of the module's
time). The stores are filled once per module.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import psycopg
import pytest
from psycopg import AsyncCursor

from app.actions.backend import BackendResponse
from app.metering.grains import GrainKey
from app.queue.dispatcher import Dispatcher, DispatchPolicy
from app.queue.intake import IntakeRules, check_records, new_record_ids
from app.queue.postgres import PostgresStore
from app.queue.records import Filters
from app.queue.registry import Identity
from app.queue.sqlite import SqliteStore
from app.queue.store import GrainPolicy, Intake, Outcome, Receipt, UsageStore
from app.runtime.metrics import Metrics
from app.runtime.retry import Attempts
from tests.conftest import PRODUCT
from tests.pg import PgServer, new_database_name
from tests.queue.fast_retry import fast_retry

T = TypeVar("T")

SMALL = 100
LARGE = 100_000
DAY = datetime(2026, 11, 26, tzinfo=UTC)
# Every measurement runs at this moment: hour 12 is open, hour 11 is due.
NOW = DAY.replace(hour=12, minute=20)
HOUR = timedelta(hours=1)
POLICY = GrainPolicy(grace=timedelta(minutes=5))
RULES = IntakeRules(
    mode="saas", product_code=PRODUCT, policy=POLICY, future_tolerance=timedelta(minutes=5)
)
# History: records of the hours 00:00 to 09:00, five to a grain, twenty grains to a
# customer (two dimensions, ten hours), sent (most accepted) at 10:10.
PER_GRAIN = 5
HISTORY_HOURS = 10
HISTORY_DIMENSIONS = ("gigabytes", "requests")
PER_CUSTOMER = PER_GRAIN * HISTORY_HOURS * len(HISTORY_DIMENSIONS)
HISTORY_RECEIVED = DAY.replace(hour=10)
# The customer whose day of history, made by the intake, every history customer repeats.
TEMPLATE = "999999999999"
# The customer the filtered pages name: it has history in both stores, and pending usage.
NAMED = "100000000000"
# Customers in the registry at least (NAMED and the next ones): the small store's.
REGISTERED = 20
# Customers with history in the registry at most (the large store's): enough that reading
# each of them shows (each registration is a transaction of its own: filling takes time).
HISTORY_REGISTERED = 400
FILL_CHUNK = 1000


def _account(n: int) -> str:
    return str(100000000000 + n)


def _record(customer: str, dimension: str, at: datetime, **extra: Any) -> dict[str, Any]:
    return {
        "CustomerAWSAccountId": customer,
        "Dimension": dimension,
        "Quantity": 1,
        "Timestamp": at.isoformat(),
        **extra,
    }


def _intakes(records: list[dict[str, Any]], now: datetime) -> list[Intake]:
    """The records as the API's intake makes them, every one good."""
    good, bad = check_records(records, RULES, now)
    assert not bad, bad
    return [intake for _, intake in good]


@functools.cache
def _template() -> tuple[Intake, ...]:
    """TEMPLATE's day of history as the API's intake makes it: ``PER_GRAIN`` records to a
    grain, every other one with an IdempotencyKey."""
    records = []
    for n in range(PER_CUSTOMER):
        grain, nth = divmod(n, PER_GRAIN)
        hour, dimension = divmod(grain, len(HISTORY_DIMENSIONS))
        records.append(
            _record(
                TEMPLATE,
                HISTORY_DIMENSIONS[dimension],
                DAY.replace(hour=hour, minute=nth),
                **({"IdempotencyKey": f"history-{TEMPLATE}-{n}"} if n % 2 else {}),
            )
        )
    return tuple(_intakes(records, HISTORY_RECEIVED))


def _history_of(account: str, count: int) -> list[Intake]:
    """The first ``count`` records of ``account``'s day: the template's with the customer
    swapped (their own ids, keys and hashes), as cheap to make as intake is to check."""
    keys: dict[GrainKey, GrainKey] = {}
    made = []
    ids = new_record_ids(HISTORY_RECEIVED, count)
    for intake, record_id in zip(_template()[:count], ids, strict=True):
        key = intake.usage.key._replace(customer_aws_account_id=account)
        record = intake.record.replace(TEMPLATE, account)
        made.append(
            intake._replace(
                record_id=record_id,
                idempotency_key=intake.idempotency_key
                and intake.idempotency_key.replace(TEMPLATE, account),
                content_hash=hashlib.sha256(record.encode()).hexdigest(),
                usage=intake.usage._replace(key=keys.setdefault(key, key)),
                record=record,
            )
        )
    return made


@functools.cache
def _history_calls(records: int) -> list[list[Intake]]:
    """The calls that bring ``records`` records of history, ``FILL_CHUNK`` to a call (made
    once for both stores)."""
    customers = -(-records // PER_CUSTOMER)
    history: list[Intake] = []
    for n in range(customers):
        # Grains are made in this order: NAMED's (_account(0)) last, so that finding a page
        # of them by reading grains in id order reads the whole history first.
        count = min(PER_CUSTOMER, records - n * PER_CUSTOMER)
        history += _history_of(_account(customers - 1 - n), count)
    return [history[start : start + FILL_CHUNK] for start in range(0, len(history), FILL_CHUNK)]


def _pending() -> list[tuple[datetime, list[dict[str, Any]]]]:
    """The usage still to send, the same in every store: (received at, records)."""
    customers = [NAMED, _account(900_001), _account(900_002)]
    retried = [_record(c, "retried", DAY.replace(hour=10, minute=20)) for c in customers[:2]]
    due = [
        _record(customers[n % 3], f"dim-{n % 5}", DAY.replace(hour=11, minute=n)) for n in range(10)
    ]
    current = [
        _record(customers[n % 3], f"dim-{n % 5}", DAY.replace(hour=12, minute=n)) for n in range(10)
    ]
    return [
        (DAY.replace(hour=10, minute=50), retried),
        (DAY.replace(hour=11, minute=55), due),
        (DAY.replace(hour=12, minute=10), current),
    ]


PENDING = sum(len(records) for _, records in _pending())


async def _fill(store: UsageStore, records: int) -> None:
    """``records`` records: history, sent, then the pending usage."""
    received = HISTORY_RECEIVED
    for call in _history_calls(records - PENDING):
        await store.ingest(call, all_or_nothing=True)
    # The registry grows with the history: customers with history are registered, up to
    # HISTORY_REGISTERED (the large store), and at least the first REGISTERED (the small).
    history_customers = -(-(records - PENDING) // PER_CUSTOMER)
    registered = max(REGISTERED, min(history_customers, HISTORY_REGISTERED))
    await asyncio.gather(
        *(
            store.record_customer(
                Identity(customer_aws_account_id=_account(n), product_code=PRODUCT), received
            )
            for n in range(registered)
        )
    )
    sent = DAY.replace(hour=10, minute=10)
    await store.freeze_due(sent, everything=True)
    grains = await store.sendable(sent, 10 * records, ignore_backoff=True)
    outcomes = []
    for n, grain in enumerate(grains):
        if n % 50 == 1:
            outcomes.append(Outcome(grain.id, "rejected", reason="CustomerNotSubscribed"))
        elif n % 97 == 2:
            outcomes.append(Outcome(grain.id, "expired", reason="SubmissionWindowPassed"))
        else:
            outcomes.append(Outcome(grain.id, "accepted", f"mr-{grain.id}", "Success"))
    await store.settle(outcomes, sent)
    (received_at, retried), *rest = _pending()
    await store.ingest(_intakes(retried, received_at), all_or_nothing=True)
    frozen_at = DAY.replace(hour=11, minute=6)
    assert await store.freeze_due(frozen_at) == len(retried)
    grains = await store.sendable(frozen_at, 10)
    await store.settle(
        [
            Outcome(g.id, "retry", error="ThrottlingException", next_attempt_at=NOW + HOUR)
            for g in grains
        ],
        frozen_at,
    )
    for received_at, records_ in rest:
        await store.ingest(_intakes(records_, received_at), all_or_nothing=True)


# -- counting ----------------------------------------------------------------


@dataclass
class Work:
    """What the database did for one operation."""

    statements: int = 0
    # SQLite: virtual-machine instructions; PostgreSQL: rows visited.
    steps: int = 0
    # PostgreSQL: blocks of the tables and their indexes read (from the cache or not).
    blocks: int = 0


class SqliteMeter:
    """Counts on every connection a SQLite store opens (its ``on_connect`` hook), only while
    an operation runs: every virtual-machine instruction, every statement."""

    def __init__(self) -> None:
        self._connections: list[sqlite3.Connection] = []
        self._work = Work()

    def on_connect(self, conn: sqlite3.Connection) -> None:
        self._connections.append(conn)

    def _step(self) -> int:
        self._work.steps += 1
        return 0

    def _statement(self, _sql: str) -> None:
        self._work.statements += 1

    async def measure(self, operation: Awaitable[T]) -> tuple[T, Work]:
        """``operation`` (not started yet) run and counted."""
        # The store is idle between calls: its connections run nothing meanwhile.
        work = self._work = Work()
        for conn in self._connections:
            conn.set_progress_handler(self._step, 1)
            conn.set_trace_callback(self._statement)
        try:
            result = await operation
        finally:
            for conn in self._connections:
                conn.set_progress_handler(None, 1)
                conn.set_trace_callback(None)
        return result, work


# Rows visited and blocks read, over the store's tables and indexes. An index search
# whose condition is not on the index's first column reads every entry of the index and
# returns only those that match: only the blocks show that.
_COUNTERS = (
    "SELECT (SELECT COALESCE(SUM(seq_tup_read + COALESCE(idx_tup_fetch, 0)), 0) "
    "FROM pg_stat_user_tables) + "
    "(SELECT COALESCE(SUM(idx_tup_read), 0) FROM pg_stat_user_indexes), "
    "(SELECT COALESCE(SUM(heap_blks_read + heap_blks_hit + COALESCE(idx_blks_read, 0) "
    "+ COALESCE(idx_blks_hit, 0) + COALESCE(toast_blks_read, 0) + COALESCE(toast_blks_hit, 0) "
    "+ COALESCE(tidx_blks_read, 0) + COALESCE(tidx_blks_hit, 0)), 0) "
    "FROM pg_statio_user_tables)"
)


class PostgresMeter:
    """Counts what one PostgreSQL store (a pool of one connection) makes its server do."""

    def __init__(self, store: PostgresStore, monitor: psycopg.AsyncConnection[Any]) -> None:
        self._store = store
        self._monitor = monitor

    async def _counters(self) -> tuple[int, int]:
        # The store's backend flushes its pending statistics as it goes idle after this.
        await self._store.run_fleet(lambda conn: conn.execute("SELECT pg_stat_force_next_flush()"))
        # Autocommit: each read of the statistics is a fresh snapshot of them.
        cursor = await self._monitor.execute(_COUNTERS)
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    async def measure(self, operation: Awaitable[T]) -> tuple[T, Work]:
        """``operation`` (not started yet) run and counted."""
        work = Work()
        execute = AsyncCursor.execute
        executemany = AsyncCursor.executemany

        async def counted_execute(cursor: AsyncCursor[Any], *args: Any, **kwargs: Any) -> Any:
            work.statements += 1
            return await execute(cursor, *args, **kwargs)

        async def counted_executemany(
            cursor: AsyncCursor[Any], query: Any, params: Iterable[Any], **kwargs: Any
        ) -> None:
            rows = list(params)
            work.statements += len(rows)
            await executemany(cursor, query, rows, **kwargs)

        rows, blocks = await self._counters()
        with (
            mock.patch.object(AsyncCursor, "execute", counted_execute),
            mock.patch.object(AsyncCursor, "executemany", counted_executemany),
        ):
            result = await operation
        rows_after, blocks_after = await self._counters()
        work.steps, work.blocks = rows_after - rows, blocks_after - blocks
        return result, work


# -- the stores ----------------------------------------------------------------


@dataclass
class Backing:
    """A store's data, filled once for the module: one small, one large."""

    kind: str
    small: str
    large: str


def _sqlite_store(
    path: str, on_connect: Callable[[sqlite3.Connection], None] | None = None
) -> SqliteStore:
    return SqliteStore(Path(path), POLICY, on_connect=on_connect)


def _postgres_store(dsn: str) -> PostgresStore:
    return PostgresStore(
        dsn, POLICY, pool_size=1, statement_timeout=60, claim_lease=30, deadline=120
    )


async def _fill_new(store: UsageStore, records: int) -> None:
    await store.open()
    try:
        await _fill(store, records)
    finally:
        await store.close()


def _vacuum(dsn: str) -> None:
    # What autovacuum does after a bulk load: the planner's statistics, the visibility map.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backing(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backing]:
    if request.param == "sqlite":
        folder = tmp_path_factory.mktemp("flat")
        paths = {n: str(folder / f"{n}.sqlite3") for n in (SMALL, LARGE)}
        for n, path in paths.items():
            asyncio.run(_fill_new(_sqlite_store(path), n))
        yield Backing("sqlite", paths[SMALL], paths[LARGE])
        return
    server: PgServer = request.getfixturevalue("postgres_server")
    made: list[str] = []
    try:
        dsns: dict[int, str] = {}
        for n in (SMALL, LARGE):
            name = new_database_name()
            dsns[n] = server.create_database(name)
            made.append(name)
            asyncio.run(_fill_new(_postgres_store(dsns[n]), n))
            _vacuum(dsns[n])
        yield Backing("postgresql", dsns[SMALL], dsns[LARGE])
    finally:
        for name in made:
            server.drop_database(name)


Operation = Callable[[UsageStore], Awaitable[Any]]


async def _measure(where: str, kind: str, operations: dict[str, Operation]) -> dict[str, Work]:
    """Each of ``operations``, in turn, on a store opened over ``where``, counted."""
    works: dict[str, Work] = {}
    if kind == "sqlite":
        meter = SqliteMeter()
        store = _sqlite_store(where, meter.on_connect)
        await store.open()
        try:
            for what, operation in operations.items():
                _, works[what] = await meter.measure(operation(store))
        finally:
            await store.close()
        return works
    pg = _postgres_store(where)
    await pg.open()
    try:
        async with await psycopg.AsyncConnection.connect(where, autocommit=True) as monitor:
            pg_meter = PostgresMeter(pg, monitor)
            for what, operation in operations.items():
                _, works[what] = await pg_meter.measure(operation(pg))
    finally:
        await pg.close()
    return works


# Flat: each figure of the large store at most FACTOR times the small store's plus SLACK.
# A scan of the history costs a thousand times more. What a larger store may add without
# reading its history: SQLite's instructions hardly change (a B-tree's descent runs below
# the virtual machine), so the slack is for data that differs a little; PostgreSQL's rows
# visited likewise; its blocks grow with the depth of every B-tree searched (one level or
# two more, on each search) and with heap pages no longer all visible.
FLAT: dict[str, dict[str, tuple[int, int]]] = {
    "sqlite": {"statements": (2, 5), "steps": (2, 500)},
    "postgresql": {"statements": (2, 5), "steps": (2, 50), "blocks": (3, 150)},
}


async def _assert_flat(backing: Backing, operations: dict[str, Operation]) -> None:
    """Each operation costs about the same on the large store as on the small one."""
    small = await _measure(backing.small, backing.kind, operations)
    large = await _measure(backing.large, backing.kind, operations)
    for what in operations:
        print(f"{backing.kind} {what}: {SMALL}: {small[what]}, {LARGE}: {large[what]}")
    bounds = FLAT[backing.kind]
    # Counted: a meter that sees nothing would pass anything.
    unseen = {
        what: work
        for what, work in small.items()
        if any(getattr(work, figure) <= 0 for figure in bounds)
    }
    assert not unseen, f"nothing counted: {unseen}"
    steep = {
        what: (small[what], large[what])
        for what in operations
        if any(
            getattr(large[what], figure) > factor * getattr(small[what], figure) + slack
            for figure, (factor, slack) in bounds.items()
        )
    }
    assert not steep, f"cost grows with history ({SMALL} records, then {LARGE}): {steep}"


# -- the work ----------------------------------------------------------------------


async def test_intake_cost_is_flat(backing: Backing) -> None:
    async def one(store: UsageStore) -> None:
        (intake,) = _intakes([_record(NAMED, "dim-0", NOW - timedelta(minutes=5))], NOW)
        (receipt,) = await store.ingest([intake], all_or_nothing=True)
        assert isinstance(receipt, Receipt)

    async def hundred(store: UsageStore) -> None:
        records = [
            _record(
                [NAMED, _account(900_001), _account(900_002)][n % 3],
                f"dim-{n % 7}",
                NOW - timedelta(minutes=n % 20),
                IdempotencyKey=f"call-{n}",
            )
            for n in range(100)
        ]
        receipts = await store.ingest(_intakes(records, NOW), all_or_nothing=True)
        assert all(isinstance(r, Receipt) and not r.replayed for r in receipts)

    await _assert_flat(backing, {"intake of one record": one, "intake of 100 records": hundred})


def _records(filters: Filters, limit: int, *, pages: int = 1) -> Operation:
    async def list_records(store: UsageStore) -> None:
        cursor = None
        for _ in range(pages):
            rows = await store.list_records(filters, cursor, limit)
            # Full pages: the same rows read from either store.
            assert len(rows) == limit, (filters, len(rows))
            cursor = rows[-1].id

    return list_records


def _grains(filters: Filters, limit: int, *, pages: int = 1) -> Operation:
    async def list_grains(store: UsageStore) -> None:
        cursor = None
        for _ in range(pages):
            rows = await store.list_grains(filters, cursor, limit)
            assert len(rows) == limit, (filters, len(rows))
            cursor = rows[-1].id

    return list_grains


async def test_listing_cost_is_flat(backing: Backing) -> None:
    # GET /v1/usage-records and /v1/usage-grains: each filter the API takes (status,
    # customer: both its forms are looked up; hour) and its cursor, pages no larger than
    # the small store fills. Records of a rare settled status (rejected, expired) are read in id
    # order until a page of them is found: that costs the page over their share of the
    # history, which a store of 100 records cannot have as small as a large one does.
    # The current hour: its grains and records are the newest, after all the history.
    hour = NOW.replace(minute=0)
    await _assert_flat(
        backing,
        {
            "records, two pages": _records(Filters(), 20, pages=2),
            "records, pending": _records(Filters("pending"), 10),
            "records, accepted, two pages": _records(Filters("accepted"), 10, pages=2),
            "records, one customer": _records(Filters(customer=NAMED), 20),
            "records, one customer, accepted": _records(Filters("accepted", NAMED), 10),
            "records, one hour": _records(Filters(hour=hour), 5),
            "grains, two pages": _grains(Filters(), 3, pages=2),
            "grains, open": _grains(Filters("open"), 3),
            "grains, frozen": _grains(Filters("frozen"), 1),
            "grains, pending": _grains(Filters("pending"), 5),
            "grains, accepted, two pages": _grains(Filters("accepted"), 2, pages=2),
            "grains, rejected": _grains(Filters("rejected"), 1),
            "grains, expired": _grains(Filters("expired"), 1),
            "grains, one customer, two pages": _grains(Filters(customer=NAMED), 3, pages=2),
            # A page read by a scan reads the whole index each time: three pages make it plain.
            "grains, one hour, three pages": _grains(Filters(hour=hour), 3, pages=3),
        },
    )


class _Accepting:
    """A backend that takes every record at once."""

    calls = 0

    async def call(
        self, action: str, payload: Mapping[str, Any], *, attempts: Attempts
    ) -> BackendResponse:
        assert action == "BatchMeterUsage"
        self.calls += 1
        return BackendResponse(
            {
                "Results": [
                    {"UsageRecord": r, "MeteringRecordId": f"mr-{n}", "Status": "Success"}
                    for n, r in enumerate(payload["UsageRecords"])
                ],
                "UnprocessedRecords": [],
            },
            None,
        )


def _dispatcher(store: UsageStore, backend: _Accepting) -> Dispatcher:
    retry = fast_retry()
    policy = DispatchPolicy(
        mode="saas",
        poll_interval=1,
        retention=timedelta(hours=168),
        key_retention=timedelta(hours=720),
        grace=POLICY.grace,
        retry=retry,
    )
    return Dispatcher(store, backend, Metrics(), policy, clock=lambda: NOW)


async def test_dispatcher_cycle_cost_is_flat(backing: Backing) -> None:
    async def cycle(store: UsageStore) -> None:
        backend = _Accepting()
        dispatcher = _dispatcher(store, backend)
        await dispatcher.run_once()
        assert backend.calls == 1
        assert await store.next_wakeup() is not None

    await _assert_flat(backing, {"dispatcher cycle": cycle})


async def test_metrics_figures_cost_is_flat(backing: Backing) -> None:
    async def figures(store: UsageStore) -> None:
        stats = await store.stats(NOW)
        assert stats.pending_records > 0
        counts = await store.customer_counts()
        assert counts["active"] > 0

    await _assert_flat(backing, {"metrics figures": figures})


@pytest.mark.parametrize("backing", ["sqlite"], indirect=True)
async def test_opening_a_sqlite_store_cost_is_flat(backing: Backing) -> None:
    # A start costs what the store has to do (its pending grains' deadlines), not what it
    # holds: the foreign-key check, which reads every record, runs only after a migration.
    # (A PostgreSQL store's open runs the same statements on any store, and its migration
    # lock and fleet settings read one row each.)
    async def opened(path: str) -> Work:
        work = Work()

        def count(conn: sqlite3.Connection) -> None:
            def step() -> int:
                work.steps += 1
                return 0

            def statement(_sql: str) -> None:
                work.statements += 1

            conn.set_progress_handler(step, 1)
            conn.set_trace_callback(statement)

        store = _sqlite_store(path, count)
        await store.open()
        await store.close()
        return work

    small, large = await opened(backing.small), await opened(backing.large)
    print(f"sqlite open: {SMALL}: {small}, {LARGE}: {large}")
    assert small.statements > 0
    assert small.steps > 0
    factor, slack = FLAT["sqlite"]["steps"]
    assert large.steps <= factor * small.steps + slack, (small, large)
