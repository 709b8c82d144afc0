"""Group commit on the SQLite store (``app.queue.sqlite``): the intake calls waiting
together for the writer are placed as one plan (``app.queue.plan.place_calls``, as the
PostgreSQL store's group): each grain they touch is read and written once, and every call
keeps the outcome it would have had alone."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from app.queue.records import Filters
from app.queue.sqlite import SqliteStore
from app.queue.store import Intake, IntakeRefused, StoreUnavailable
from tests.queue.test_customers import sns
from tests.queue.test_postgres_group_commit import (
    NOW,
    POLICY,
    Outcome,
    _comparable,
    _intake,
    _isolation_calls,
)

Statements = list[str]


@asynccontextmanager
async def _store(path: Path, statements: Statements | None = None) -> AsyncIterator[SqliteStore]:
    """A SQLite store; ``statements`` collects every statement its connections run."""

    def trace(conn: sqlite3.Connection) -> None:
        if statements is not None:
            conn.set_trace_callback(statements.append)

    store = SqliteStore(path, POLICY, on_connect=trace)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def _outcome(call: Awaitable[Any]) -> Outcome:
    try:
        return list(await call)
    except (IntakeRefused, StoreUnavailable) as exc:
        return exc


async def _one_group(store: SqliteStore, calls: list[tuple[list[Intake], bool]]) -> list[Outcome]:
    """``calls`` queued while the writer is held by another job, so that it takes them
    all in its next group: their outcomes."""
    taken, gate = threading.Event(), threading.Event()

    def hold(_conn: sqlite3.Connection) -> None:
        taken.set()
        gate.wait(10)

    held = asyncio.ensure_future(store._submit(hold))
    assert await asyncio.to_thread(taken.wait, 10)
    pending = [asyncio.ensure_future(_outcome(store.ingest(i, all_or_nothing=a))) for i, a in calls]
    # Each call's first step queues its job.
    for _ in range(10):
        await asyncio.sleep(0)
    assert store._jobs.qsize() == len(calls)
    gate.set()
    await held
    return list(await asyncio.gather(*pending))


async def _sums(store: SqliteStore) -> dict[str, Decimal]:
    grains = await store.list_grains(Filters(), None, 100)
    return {
        g.key.customer_aws_account_id or g.key.customer_identifier: g.content.quantity
        for g in grains
    }


async def _isolation(
    path: Path, seed: Intake, calls: list[tuple[list[Intake], bool]], *, together: bool
) -> tuple[list[Outcome], dict[str, Decimal], int]:
    async with _store(path) as store:
        event = sns("unsubscribe-success", "cust-ended", NOW)
        assert (await store.apply_event(event, NOW, timedelta(minutes=15))).outcome == "applied"
        await store.ingest([seed], all_or_nothing=True)
        commits = store.commits
        if together:
            outcomes = await _one_group(store, calls)
        else:
            outcomes = [await _outcome(store.ingest(i, all_or_nothing=a)) for i, a in calls]
        return outcomes, await _sums(store), store.commits - commits


async def test_each_call_of_a_group_keeps_the_outcome_it_has_alone(tmp_path: Path) -> None:
    # The PostgreSQL group's cases (test_postgres_group_commit): a customer whose
    # subscription ended refused whole or alone, a replay of a stored key, a call
    # refused whole for a key conflict (its new key not taken), that key's first use
    # by the next call and its replay by the one after.
    seed, calls = _isolation_calls()
    grouped, sums, groups = await _isolation(
        tmp_path / "together.sqlite3", seed, calls, together=True
    )
    one_by_one, alone_sums, alone_groups = await _isolation(
        tmp_path / "alone.sqlite3", seed, calls, together=False
    )
    assert groups == 1
    # One by one, only the calls that wrote something commit: the first, the partial
    # one, the key's first use and the other customer's (refusals and replays write
    # nothing).
    assert alone_groups == 4
    assert isinstance(grouped[1], IntakeRefused)
    assert isinstance(grouped[4], IntakeRefused)
    assert [_comparable(o) for o in grouped] == [_comparable(o) for o in one_by_one]
    assert sums == alone_sums == {f"{100000000001}": 22, f"{100000000002}": 17}


def _count(statements: Statements, start: str) -> int:
    return sum(1 for s in statements if s.lstrip().startswith(start))


async def test_a_hot_grain_is_read_and_written_once_per_group(tmp_path: Path) -> None:
    statements: Statements = []
    async with _store(tmp_path / "q.sqlite3", statements) as store:
        await store.ingest([_intake(1, 1)], all_or_nothing=True)
        calls = [([_intake(1, n)], True) for n in range(1, 51)]
        statements.clear()
        outcomes = await _one_group(store, calls)
        assert all(isinstance(o, list) for o in outcomes)
        # 50 calls to one grain: one lookup of it, one write of it, their records in
        # one batch (traced a row each), one savepoint for them all, one commit (and the
        # held job's, which runs alone: without a savepoint).
        assert _count(statements, "WITH k") == 1
        assert _count(statements, "UPDATE grains SET content") == 1
        assert _count(statements, "INSERT INTO usage_records") == 50
        assert _count(statements, "SAVEPOINT") == 1
        assert _count(statements, "COMMIT") == 2
        assert await _sums(store) == {f"{100000000001}": Decimal(1 + 50 * 51 // 2)}


async def test_calls_past_a_units_records_are_placed_in_several_units(tmp_path: Path) -> None:
    # Consecutive calls share a unit up to 1,000 records: three calls of 400 make two
    # units (two lookups of their grain), in one transaction (one commit, and the held
    # job's), with one savepoint each.
    statements: Statements = []
    async with _store(tmp_path / "q.sqlite3", statements) as store:
        calls = [([_intake(1, 1) for _ in range(400)], True) for _ in range(3)]
        statements.clear()
        outcomes = await _one_group(store, calls)
        assert all(isinstance(o, list) and len(o) == 400 for o in outcomes)
        assert _count(statements, "WITH k") == 2
        assert _count(statements, "SAVEPOINT") == 2
        assert _count(statements, "COMMIT") == 2
        assert await _sums(store) == {f"{100000000001}": Decimal(1200)}


async def test_a_call_whose_records_the_database_refuses_fails_alone(tmp_path: Path) -> None:
    # A fault inside calls placed together (here a trigger that refuses one call's
    # record) fails the unit; its calls are written again one by one, so only the call
    # whose own record the database refuses is told the store could not write it.
    async with _store(tmp_path / "q.sqlite3") as store:

        def add_trigger(conn: sqlite3.Connection) -> None:
            conn.execute(
                "CREATE TRIGGER refuse_one AFTER INSERT ON usage_records "
                "WHEN NEW.record = 'refused' BEGIN SELECT RAISE(ABORT, 'disk trouble'); END"
            )

        await store._submit(add_trigger)
        bad = _intake(2, 5)._replace(record="refused")
        calls = [([_intake(1, 1)], True), ([bad], True), ([_intake(3, 7)], True)]
        commits = store.commits
        good, refused, other = await _one_group(store, calls)
        assert isinstance(refused, StoreUnavailable), refused
        assert "disk trouble" in str(refused)
        for outcome in (good, other):
            assert isinstance(outcome, list), outcome
        assert store.commits - commits == 1
        assert await _sums(store) == {f"{100000000001}": 1, f"{100000000003}": 7}
