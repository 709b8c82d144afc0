"""The SQLite store: durable before it answers, group commit, idempotency, migrations."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from app.metering.billing import hour_of
from app.metering.grains import GrainKey, Usage, batch_record
from app.queue.records import Filters
from app.queue.sqlite import SqliteStore
from app.queue.store import (
    GrainPolicy,
    Intake,
    IntakeFailure,
    IntakeRefused,
    Receipt,
    StoreUnavailable,
)
from tests.queue.conftest import LICENSE, START, StoreFactory

POLICY = GrainPolicy(grace=timedelta(minutes=5))


def _intake(n: int, *, key: str | None = None, quantity: int = 1, content: str = "") -> Intake:
    grain = GrainKey("batch", "", LICENSE, "", f"1000000000{n % 3:02d}", "gb", hour_of(START))
    return Intake(
        record_id=f"ur_{n:08d}",
        idempotency_key=key,
        content_hash=f"hash-{content or n}",
        usage=Usage(grain, START, Decimal(quantity), False),
        record=f'{{"n":{n}}}',
        received_at=START,
    )


async def test_records_are_on_disk_when_ingest_returns(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    store = SqliteStore(path, POLICY)
    await store.open()
    try:
        (receipt,) = await store.ingest([_intake(1)], all_or_nothing=True)
        assert isinstance(receipt, Receipt)
        # Another connection (another process, after a crash) sees it at once.
        with sqlite3.connect(path) as other:
            assert other.execute("SELECT COUNT(*) FROM usage_records").fetchone() == (1,)
            mode = other.execute("PRAGMA journal_mode").fetchone()[0]
            assert mode == "wal"
    finally:
        await store.close()


async def test_concurrent_calls_share_commits(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "q.sqlite3", POLICY)
    await store.open()
    try:
        before = store.commits
        results = await asyncio.gather(
            *(store.ingest([_intake(n)], all_or_nothing=True) for n in range(200))
        )
        assert all(isinstance(r[0], Receipt) for r in results)
        commits = store.commits - before
        # 200 calls, far fewer fsyncs: calls waiting during a commit share the next.
        assert commits < 100, commits
        grains = await store.list_grains(Filters(), None, 10)
        assert sorted(g.content.quantity for g in grains) == [Decimal(66), Decimal(67), Decimal(67)]
    finally:
        await store.close()


async def test_a_failing_job_undoes_its_own_writes_alone_or_beside_others(
    tmp_path: Path,
) -> None:
    # A job alone in its transaction runs without a savepoint (its failure rolls the
    # transaction back); beside others, with one (its failure undoes only its writes).
    store = SqliteStore(tmp_path / "q.sqlite3", POLICY)
    await store.open()

    def failing(n: int) -> Callable[[sqlite3.Connection], object]:
        def run(conn: sqlite3.Connection) -> object:
            store._ingest(conn, [_intake(n)], True)
            raise RuntimeError(f"job {n} failed after writing")

        return run

    try:
        with pytest.raises(RuntimeError, match="job 1 failed"):
            await store._submit(failing(1))
        assert await store.get_record("ur_00000001") is None
        (receipt,) = await store.ingest([_intake(2)], all_or_nothing=True)
        assert isinstance(receipt, Receipt)
        commits = store.commits
        for n in range(10, 70, 3):
            good, failed, other = await asyncio.gather(
                store.ingest([_intake(n)], all_or_nothing=True),
                store._submit(failing(n + 1)),
                store.ingest([_intake(n + 2)], all_or_nothing=True),
                return_exceptions=True,
            )
            assert isinstance(failed, RuntimeError), failed
            for answered in (good, other):
                assert isinstance(answered, list), answered
                assert isinstance(answered[0], Receipt), answered
            assert await store.get_record(f"ur_{n + 1:08d}") is None
        # Jobs shared transactions (their savepoints were used), and each failed one's
        # writes are gone while its neighbours' stay.
        assert store.commits - commits < 40
        grains = await store.list_grains(Filters(), None, 10)
        assert sum(g.records for g in grains) == 1 + 2 * 20
    finally:
        await store.close()


async def test_data_and_schema_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    store = SqliteStore(path, POLICY)
    await store.open()
    await store.ingest([_intake(1, key="k-1")], all_or_nothing=True)
    await store.close()
    store = SqliteStore(path, POLICY)
    await store.open()
    try:
        record = await store.get_record("ur_00000001")
        assert record is not None
        assert record.record == {"n": 1}
        assert record.idempotency_key == "k-1"
        with sqlite3.connect(path) as other:
            versions = [v for (v,) in other.execute("SELECT version FROM schema_migrations")]
        assert versions == [1, 2, 3, 4, 5, 6]
    finally:
        await store.close()


async def test_idempotency_keys(stores: StoreFactory) -> None:
    store = stores(POLICY)
    await store.open()
    try:
        (first,) = await store.ingest([_intake(1, key="k", content="a")], all_or_nothing=True)
        (again,) = await store.ingest([_intake(2, key="k", content="a")], all_or_nothing=True)
        assert isinstance(first, Receipt)
        assert isinstance(again, Receipt)
        assert again.record_id == first.record_id
        assert again.replayed
        with pytest.raises(IntakeRefused) as refused:
            await store.ingest([_intake(3), _intake(4, key="k", content="b")], all_or_nothing=True)
        assert refused.value.failures[0].conflict
        assert refused.value.failures[0].index == 1
        # All or nothing: record 3 was not written either.
        assert await store.get_record("ur_00000003") is None
        partial = await store.ingest(
            [_intake(5), _intake(6, key="k", content="b")], all_or_nothing=False
        )
        assert isinstance(partial[0], Receipt)
        assert isinstance(partial[1], IntakeFailure)
        assert await store.get_record("ur_00000005") is not None
        first_record = await store.get_record("ur_00000001")
        assert first_record is not None
        # The replay (record 2, same key and content) added nothing to the grain.
        assert first_record.grain.content.quantity == Decimal(1)
    finally:
        await store.close()


async def test_an_integer_grain_past_int32_goes_on_as_decimal_up_to_awss_maximum(
    stores: StoreFactory,
) -> None:
    store = stores(POLICY)
    await store.open()
    try:
        (first,) = await store.ingest([_intake(3, quantity=2_000_000_000)], all_or_nothing=True)
        await store.ingest([_intake(6, quantity=200_000_000)], all_or_nothing=True)
        assert isinstance(first, Receipt)
        grain = await store.get_grain(first.grain_id)
        assert grain is not None
        # Past Quantity's 2,147,483,647 the total is sent as QuantityAsDecimal.
        assert grain.content.quantity == Decimal(2_200_000_000)
        record = batch_record(grain.key, grain.content)
        assert record["QuantityAsDecimal"] == "2200000000"
        assert "Quantity" not in record
        # The decimal pattern's ceiling, 9,999,999,999.999999, still holds.
        with pytest.raises(IntakeRefused) as refused:
            await store.ingest(
                [_intake(n, quantity=2_147_483_647) for n in (9, 12, 15, 18)],
                all_or_nothing=True,
            )
        assert "maximum" in refused.value.failures[0].message
    finally:
        await store.close()


async def test_an_unusable_path_fails_loudly(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:
        # root ignores permissions; a file where the directory should be cannot be ignored.
        target = tmp_path / "not-a-dir"
        target.write_text("x")
        path = target / "q.sqlite3"
    else:
        path = locked / "q.sqlite3"
    store = SqliteStore(path, POLICY)
    with pytest.raises(StoreUnavailable):
        await store.open()


async def test_reads_do_not_wait_for_the_writer(tmp_path: Path) -> None:
    """Listings, lookups and counts have their own connection: a writer held up
    by a long transaction (a large intake) does not hold them up, and what
    was committed before is what they see."""
    store = SqliteStore(tmp_path / "q.sqlite3", POLICY)
    await store.open()
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        await store.ingest([_intake(1)], all_or_nothing=True)
        busy = asyncio.create_task(
            store._submit(
                lambda conn: (
                    conn.execute("DELETE FROM usage_records"),
                    # The writer thread waits inside its transaction, uncommitted.
                    asyncio.run_coroutine_threadsafe(release.wait(), loop).result(),
                )
            )
        )
        async with asyncio.timeout(30):
            assert await store.get_record("ur_00000001") is not None
            (record,) = await store.list_records(Filters(), None, 10)
            assert record.id == "ur_00000001"
            (grain,) = await store.list_grains(Filters(), None, 10)
            assert await store.get_grain(grain.id) is not None
            assert (await store.stats(START)).pending_records == 1
            assert await store.next_wakeup() is not None
        assert not busy.done()
        release.set()
        await busy
        # The next read sees the commit it waited for.
        assert await store.get_record("ur_00000001") is None
    finally:
        release.set()
        await store.close()


async def test_intake_finds_grains_by_index_whatever_the_store_holds(tmp_path: Path) -> None:
    # SQLite's virtual-machine steps for one single-record call (counted with a
    # progress handler, not timed): a store of 3,000 grains costs what one of 10
    # does. A lookup that scans the grains grows with them.
    def grain(n: int) -> GrainKey:
        return GrainKey("batch", "", LICENSE, "", f"{100000000000 + n}", "gb", hour_of(START))

    def intake(n: int, record: int) -> Intake:
        return Intake(
            f"ur_{record:012d}", None, "h", Usage(grain(n), START, Decimal(1), False), "{}", START
        )

    async def steps_of_one_call(held: int, path: Path) -> int:
        store = SqliteStore(path, POLICY)
        await store.open()
        try:
            await store.ingest([intake(n, n) for n in range(held)], all_or_nothing=True)
        finally:
            await store.close()
        conn = store._connect()
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        conn.set_progress_handler(count, 10)
        conn.execute("BEGIN IMMEDIATE")
        # One record for a grain that exists, one for a new grain.
        store._ingest(conn, [intake(1, 10**6), intake(10**5, 10**6 + 1)], True)
        conn.execute("COMMIT")
        conn.close()
        return steps

    small = await steps_of_one_call(10, tmp_path / "small.sqlite3")
    large = await steps_of_one_call(3000, tmp_path / "large.sqlite3")
    assert small > 0
    # A B-tree one level deeper costs a few steps more, never hundreds.
    assert large <= small * 1.3, (small, large)
