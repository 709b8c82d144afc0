"""The shared store on a real PostgreSQL server: replicas sum into the same grains, one
claims each for sending, a dead one's claims are taken over, faults are 503s."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from decimal import Decimal
from typing import Any, TypeVar

import psycopg
import pytest

from app.metering.billing import SubmissionWindows, hour_of
from app.metering.grains import GrainKey, Usage
from app.queue.postgres import PostgresStore
from app.queue.records import Filters
from app.queue.store import (
    GrainPolicy,
    Intake,
    Outcome,
    Receipt,
    StoreUnavailable,
)
from tests.pg import PgServer
from tests.queue.conftest import LICENSE, START

POLICY = GrainPolicy(grace=timedelta(minutes=5))
HOUR = hour_of(START)
T = TypeVar("T")
_serial = iter(range(1, 10**9))


def _intake(customer: int, quantity: int, *, key: str | None = None) -> Intake:
    n = next(_serial)
    grain = GrainKey("batch", "", LICENSE, "", f"{100000000000 + customer}", "gb", HOUR)
    return Intake(
        record_id=f"ur_{n:012d}",
        idempotency_key=key,
        content_hash=f"hash-{customer}-{quantity}",
        usage=Usage(grain, START, Decimal(quantity), False),
        record=f'{{"n":{n}}}',
        received_at=START,
    )


@asynccontextmanager
async def _replicas(
    dsn: str,
    count: int,
    *,
    lease: float = 30,
    statement_timeout: float = 5,
    policy: GrainPolicy = POLICY,
) -> AsyncIterator[list[PostgresStore]]:
    stores = [
        PostgresStore(
            dsn,
            policy,
            pool_size=4,
            statement_timeout=statement_timeout,
            claim_lease=lease,
            owner=f"replica-{i}",
        )
        for i in range(count)
    ]
    # Replicas starting together: migrations run once, under the advisory lock.
    await asyncio.gather(*(store.open() for store in stores))
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


async def test_replicas_starting_together_migrate_once(postgres_dsn: str) -> None:
    async with _replicas(postgres_dsn, 5):
        pass
    with psycopg.connect(postgres_dsn) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == [1, 2, 3, 4, 5]


async def test_concurrent_ingest_and_freezing_lose_nothing_and_split_nothing(
    postgres_dsn: str,
) -> None:
    """Three replicas add to the same grains while freezing goes on: every unit ends
    in exactly one grain, open or frozen, and frozen content never changes."""
    rng = random.Random(7)
    added: dict[int, int] = {}
    async with _replicas(postgres_dsn, 3) as stores:

        async def ingest(store: PostgresStore) -> None:
            for _ in range(12):
                batch = [_intake(rng.randrange(4), rng.randrange(1, 9)) for _ in range(5)]
                outcomes = await store.ingest(batch, all_or_nothing=True)
                assert all(isinstance(o, Receipt) for o in outcomes)
                for intake in batch:
                    customer = int(intake.usage.key.customer_aws_account_id) - 100000000000
                    added[customer] = added.get(customer, 0) + int(intake.usage.quantity)

        async def freeze(store: PostgresStore) -> None:
            for _ in range(6):
                await store.freeze_due(START + timedelta(hours=1, minutes=6), everything=True)
                await asyncio.sleep(0.01)

        frozen_before = await _frozen_payloads(stores[0])
        await asyncio.gather(*(ingest(s) for s in stores), freeze(stores[1]), freeze(stores[2]))
        grains = await stores[0].list_grains(Filters(), None, 1000)
        frozen_after = await _frozen_payloads(stores[0])
    assert frozen_before == {}
    totals: dict[int, Decimal] = {}
    for grain in grains:
        customer = int(grain.key.customer_aws_account_id) - 100000000000
        totals[customer] = totals.get(customer, Decimal(0)) + grain.content.quantity
        if grain.status == "frozen":
            # The payload sent is the content it froze with.
            assert grain.payload == frozen_after[grain.id]
            assert '"Quantity":' + str(int(grain.content.quantity)) in (grain.payload or "")
    assert totals == {c: Decimal(q) for c, q in added.items()}
    # Usage that met a frozen grain rolled forward, one hour at a time.
    assert {g.key.hour for g in grains} <= {HOUR + timedelta(hours=h) for h in range(12)}


async def _frozen_payloads(store: PostgresStore) -> dict[int, str | None]:
    grains = await store.list_grains(Filters(status="frozen"), None, 1000)
    return {g.id: g.payload for g in grains}


async def test_each_due_grain_is_claimed_by_exactly_one_replica(postgres_dsn: str) -> None:
    async with _replicas(postgres_dsn, 3) as stores:
        await stores[0].ingest([_intake(c, 1) for c in range(30)], all_or_nothing=True)
        now = START + timedelta(hours=1, minutes=6)
        await stores[0].freeze_due(now)
        claims = await asyncio.gather(*(s.sendable(now, 12) for s in stores))
        ids = [g.id for claim in claims for g in claim]
        assert len(ids) == len(set(ids)) == 30
        # Shared, not raced: nobody got everything.
        assert all(len(claim) <= 12 for claim in claims)
        # While the claims hold, nobody else gets those grains.
        assert await stores[0].sendable(now, 100) == []


async def test_a_dead_replicas_claims_are_taken_over_after_the_lease(postgres_dsn: str) -> None:
    async with _replicas(postgres_dsn, 2, lease=30) as (dead, alive):
        await dead.ingest([_intake(1, 5)], all_or_nothing=True)
        now = START + timedelta(hours=1, minutes=6)
        await dead.freeze_due(now)
        (claimed,) = await dead.sendable(now, 10)
        # The replica dies before it settles: within the lease, the grain stays its.
        assert await alive.sendable(now + timedelta(seconds=29), 10) == []
        (taken,) = await alive.sendable(now + timedelta(seconds=31), 10)
        assert taken.id == claimed.id
        # The frozen payload is what the dead replica sent: the resend is identical.
        assert taken.payload == claimed.payload
        await alive.settle(
            [Outcome(taken.id, "accepted", metering_record_id="mr-1", reason="Success")],
            now + timedelta(seconds=32),
        )
        # The dead replica's late settle of the same grain changes nothing.
        await dead.settle(
            [Outcome(claimed.id, "rejected", reason="Late")], now + timedelta(seconds=40)
        )
        grain = await alive.get_grain(taken.id)
        assert grain is not None
        assert grain.status == "accepted"
        assert grain.metering_record_id == "mr-1"


async def test_a_grain_being_sent_is_not_expired_under_its_sender(postgres_dsn: str) -> None:
    # A window that closes a few seconds after the grain falls due.
    policy = GrainPolicy(
        grace=timedelta(minutes=5),
        windows=SubmissionWindows(batch=timedelta(hours=1, minutes=6, seconds=10)),
    )
    async with _replicas(postgres_dsn, 2, lease=30, policy=policy) as (sender, other):
        await sender.ingest([_intake(1, 5)], all_or_nothing=True)
        now = START + timedelta(hours=1, minutes=6)
        await sender.freeze_due(now)
        (claimed,) = await sender.sendable(now, 10)
        # Past the deadline, but the sender's answer may still say "accepted".
        assert await other.expire_overdue(now + timedelta(seconds=20)) == []
        await sender.settle(
            [Outcome(claimed.id, "accepted", metering_record_id="mr-2", reason="Success")],
            now + timedelta(seconds=21),
        )
        grain = await other.get_grain(claimed.id)
        assert grain is not None
        assert grain.status == "accepted"
        # Unclaimed and past its deadline, a grain does expire.
        await sender.ingest([_intake(2, 5)], all_or_nothing=True)
        await sender.freeze_due(now)
        (expired,) = await other.expire_overdue(now + timedelta(seconds=20))
        assert expired.key.customer_aws_account_id.endswith("2")


async def test_an_idempotency_key_is_unique_across_replicas(postgres_dsn: str) -> None:
    async with _replicas(postgres_dsn, 3) as stores:
        results = await asyncio.gather(
            *(s.ingest([_intake(2, 4, key="job-7")], all_or_nothing=True) for s in stores)
        )
        receipts = [r[0] for r in results]
        assert all(isinstance(r, Receipt) for r in receipts)
        ids = {r.record_id for r in receipts if isinstance(r, Receipt)}
        assert len(ids) == 1
        assert sum(1 for r in receipts if isinstance(r, Receipt) and not r.replayed) == 1
        (grain,) = await stores[0].list_grains(Filters(), None, 10)
        assert grain.content.quantity == 4


async def test_a_database_that_goes_away_is_503_and_nothing_half_applied(
    private_postgres: PgServer,
) -> None:
    dsn = private_postgres.create_database("queue")
    async with _replicas(dsn, 1, statement_timeout=2) as (store,):
        await store.ingest([_intake(1, 3)], all_or_nothing=True)
        private_postgres.stop("immediate")
        with pytest.raises(StoreUnavailable):
            await store.ingest([_intake(1, 4)], all_or_nothing=True)
        with pytest.raises(StoreUnavailable):
            await store.check_writable()
        private_postgres.start()
        # The pool reconnects by itself; the failed call left nothing behind.
        await _eventually(lambda: store.check_writable())
        (grain,) = await store.list_grains(Filters(), None, 10)
        assert grain.content.quantity == 3
        await store.ingest([_intake(1, 4)], all_or_nothing=True)
        (grain,) = await store.list_grains(Filters(), None, 10)
        assert grain.content.quantity == 7


async def test_a_statement_stuck_behind_a_lock_times_out_as_503(postgres_dsn: str) -> None:
    async with _replicas(postgres_dsn, 1, statement_timeout=1) as (store,):
        await store.ingest([_intake(3, 1)], all_or_nothing=True)
        with psycopg.connect(postgres_dsn) as blocker:
            blocker.execute("SELECT id FROM grains FOR UPDATE")
            with pytest.raises(StoreUnavailable):
                await store.ingest([_intake(3, 1)], all_or_nothing=True)
        await store.ingest([_intake(3, 1)], all_or_nothing=True)
        (grain,) = await store.list_grains(Filters(), None, 10)
        assert grain.content.quantity == 2


class _LostCommitAnswer(PostgresStore):
    """Commits, then loses the answer once, as a connection dropped during COMMIT would."""

    lost = True  # disarmed until the test arms it

    async def _run(
        self,
        work: Callable[[Any], Awaitable[T]],
        *,
        writes: bool = True,
        deadline: float | None = None,
        pool: Any = None,
    ) -> T:
        result = await super()._run(work, writes=writes, deadline=deadline, pool=pool)
        if writes and not self.lost:
            self.lost = True
            raise StoreUnavailable("connection lost during COMMIT")
        return result


async def test_a_commit_whose_answer_was_lost_is_settled_by_record_id(postgres_dsn: str) -> None:
    """The intake's call fails though it committed; its records, spooled with the same ids,
    are recognised when moved: not added again."""
    store = _LostCommitAnswer(
        postgres_dsn, POLICY, pool_size=2, statement_timeout=5, claim_lease=30
    )
    await store.open()
    try:
        intakes = [_intake(4, 2), _intake(5, 3), _intake(4, 1, key="job-lost")]
        store.lost = False  # the next write commits, and its answer is lost
        with pytest.raises(StoreUnavailable):
            await store.ingest(intakes, all_or_nothing=True)
        # A record the store already has is settled as such (None); a new one is added.
        extra = _intake(6, 5)
        outcomes = await store.ingest_spooled([*intakes, extra])
        assert outcomes[:3] == [None, None, None]
        assert isinstance(outcomes[3], Receipt)
        assert not outcomes[3].replayed
        grains = await store.list_grains(Filters(), None, 10)
        assert sorted(g.content.quantity for g in grains) == [3, 3, 5]
        # Moved again (its settling was lost too): nothing changes.
        assert await store.ingest_spooled([*intakes, extra]) == [None] * 4
        grains = await store.list_grains(Filters(), None, 10)
        assert sorted(g.content.quantity for g in grains) == [3, 3, 5]
    finally:
        await store.close()


async def _eventually(check: Callable[[], Awaitable[object]], within: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            await check()
            return
        except StoreUnavailable:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)
