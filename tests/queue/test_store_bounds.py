"""Every wait on the shared PostgreSQL store is bounded on the sidecar's side: each
connection carries its timeouts and keepalives, an open against a server that never
answers gives up, a replica stalled mid-transaction does not hold its grains for the
fleet, and a dispatcher does not spin on grains another replica holds. (A call past its
deadline going to the spool: tests/queue/test_spool.py.)"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from app.actions.sandbox import SandboxBackend
from app.metering.billing import hour_of, utc_now
from app.metering.grains import GrainKey, Usage
from app.queue.dispatcher import Dispatcher, DispatchPolicy
from app.queue.postgres import PostgresStore
from app.queue.records import Filters
from app.queue.store import GrainPolicy, Intake, StoreUnavailable
from app.runtime.metrics import Metrics
from tests.conftest import PRODUCT
from tests.pg import PgServer
from tests.queue.conftest import LICENSE
from tests.queue.fast_retry import fast_retry
from tests.queue.pg_faults import frozen

POLICY = GrainPolicy(grace=timedelta(minutes=5))
RETRY = fast_retry()


def _store(dsn: str, **options: Any) -> PostgresStore:
    """A store with short bounds (``options`` override them)."""
    settings: dict[str, Any] = {
        "pool_size": 2,
        "statement_timeout": 5,
        "claim_lease": 30,
        "connect_timeout": 2,
        "deadline": 5,
        "idle_transaction_timeout": 10,
        **options,
    }
    return PostgresStore(dsn, POLICY, **settings)


async def test_every_connection_carries_every_bound(postgres_dsn: str) -> None:
    store = _store(postgres_dsn, statement_timeout=2, idle_transaction_timeout=5)
    await store.open()
    try:
        kwargs = store.connection_kwargs()
        assert kwargs["keepalives"] == 1
        assert kwargs["keepalives_idle"] > 0
        assert kwargs["keepalives_interval"] > 0
        assert kwargs["keepalives_count"] > 0
        # libpq counts whole seconds, 2 at least.
        assert kwargs["connect_timeout"] == 2
        settings = await store._run(_settings, writes=False)
        assert settings == {
            "statement_timeout": "2s",
            "lock_timeout": "2s",
            "idle_in_transaction_session_timeout": "5s",
        }
    finally:
        await store.close(budget=1)


async def test_a_store_that_never_answers_fails_its_open_within_its_bounds(
    private_postgres: PgServer,
) -> None:
    dsn = private_postgres.create_database("queue")
    store = _store(dsn, deadline=2)
    with frozen(private_postgres):
        with pytest.raises(StoreUnavailable, match="cannot open"):
            # Bounded by far more than connect timeout + deadline: without, forever.
            await asyncio.wait_for(store.open(), 60)
        assert store.problem is not None
    await store.open()
    assert store.problem is None
    await store.close(budget=1)


async def _settings(conn: Any) -> dict[str, str]:
    names = ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
    found = {}
    for name in names:
        cursor = await conn.execute(f"SHOW {name}".encode())
        row = await cursor.fetchone()
        found[name] = row[0]
    return found


async def test_a_stalled_replica_does_not_hold_its_grains_for_the_fleet(
    postgres_dsn: str,
) -> None:
    stalled_store, other = (
        _store(postgres_dsn, statement_timeout=1, idle_transaction_timeout=2, owner=f"r-{n}")
        for n in range(2)
    )
    await stalled_store.open()
    await other.open()
    holding = asyncio.Event()

    async def stall() -> None:
        # A replica locks the grain for its intake, then stalls (paused, cut off):
        # it sends nothing more, and its session sits idle in its transaction.
        assert stalled_store._pool is not None
        async with stalled_store._pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT id FROM grains FOR UPDATE")
            holding.set()
            await asyncio.sleep(120)

    try:
        await other.ingest([_intake("a"), _intake("b")], all_or_nothing=True)
        stalled = asyncio.create_task(stall())
        await holding.wait()
        loop = asyncio.get_running_loop()
        end = loop.time() + 60
        while True:
            try:
                await other.ingest([_intake("c")], all_or_nothing=True)
                break
            except StoreUnavailable:
                assert loop.time() < end, "the stalled replica held the grain all along"
                await asyncio.sleep(0.3)
        # The server ended the stalled transaction; the replica itself is still stalled.
        assert not stalled.done()
        (grain,) = await other.list_grains(Filters(), None, 10)
        assert grain.content.quantity == 3
        stalled.cancel()
        with contextlib.suppress(asyncio.CancelledError, psycopg.Error):
            await stalled
    finally:
        await stalled_store.close(budget=1)
        await other.close(budget=1)


async def test_a_dispatcher_does_not_spin_on_grains_another_replica_holds(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder, idle = (_store(postgres_dsn, claim_lease=300, owner=f"replica-{n}") for n in range(2))
    await holder.open()
    await idle.open()
    try:
        two_hours_ago = utc_now() - timedelta(hours=2)
        await holder.ingest([_intake("d", at=two_hours_ago)], all_or_nothing=True)
        await holder.freeze_due(utc_now())
        # Claimed by the holder, which then stalls: due, and not the idle replica's to send.
        assert len(await holder.sendable(utc_now(), 10)) == 1
        cycles = 0
        next_wakeup = idle.next_wakeup

        async def counting() -> datetime | None:
            nonlocal cycles
            cycles += 1
            return await next_wakeup()

        monkeypatch.setattr(idle, "next_wakeup", counting)
        dispatcher = Dispatcher(
            idle,
            SandboxBackend(product_code=PRODUCT),
            Metrics(),
            DispatchPolicy(
                mode="saas",
                poll_interval=5,
                retention=timedelta(hours=168),
                key_retention=timedelta(hours=720),
                grace=timedelta(0),
                retry=RETRY,
            ),
        )
        dispatcher.start()
        await asyncio.sleep(4)
        await dispatcher.stop(budget=5)
        # Every 50 ms would be about 80 cycles in 4 s; a pause of a second, about 4.
        assert 1 <= cycles <= 10, cycles
    finally:
        await holder.close(budget=1)
        await idle.close(budget=1)


_serial = iter(range(1, 10**9))


def _intake(key: str, content: str = "", *, at: datetime | None = None) -> Intake:
    """A record of customer 555566667777, this hour (or ``at``'s), with IdempotencyKey
    ``key`` unless it is one letter."""
    n = next(_serial)
    when = at or utc_now()
    grain = GrainKey("batch", "", LICENSE, "", "555566667777", "gb", hour_of(when))
    return Intake(
        record_id=f"ur_bound{n:012d}",
        idempotency_key=key if len(key) > 1 else None,
        content_hash=content or f"hash-{n}",
        usage=Usage(grain, when, Decimal(1), False),
        record=f'{{"n":{n}}}',
        received_at=when,
    )
