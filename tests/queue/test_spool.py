"""The shared store's local spool, in-process on a real PostgreSQL server: usage the store
cannot take is spooled and answered all the same, moved in order once the store answers,
settled by record id, IdempotencyKeys kept, refusals visible and counted; a database
stopped with SIGSTOP holds no call past the store deadline. (The bounds themselves:
tests/queue/test_store_bounds.py; sidecar processes: tests/queue/test_spool_sidecars.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from app.actions.sandbox import SandboxBackend
from app.metering.billing import hour_of, utc_now
from app.metering.errors import Conflict
from app.metering.grains import GrainKey, Usage
from app.queue.dispatcher import Dispatcher, DispatchPolicy
from app.queue.intake import IntakeRules
from app.queue.postgres import PostgresStore
from app.queue.records import Filters, UsageRecordsReceipt
from app.queue.spool import Spool, SpoolFile
from app.queue.sqlite import SqliteStore
from app.queue.store import GrainPolicy, Intake, StoreUnavailable
from app.queue.usage_queue import UsageQueue
from app.runtime.metrics import Metrics
from tests.conftest import PRODUCT
from tests.pg import PgServer, new_database_name
from tests.queue.conftest import LICENSE
from tests.queue.fast_retry import fast_retry
from tests.queue.pg_faults import TcpProxy, frozen
from tests.queue.test_customers import sns

POLICY = GrainPolicy(grace=timedelta(minutes=5))
RETRY = fast_retry()


def record(customer: str = "111122223333", quantity: int = 1, **fields: Any) -> dict[str, Any]:
    """A SaaS record of this hour (its Timestamp defaults to now)."""
    return {
        "CustomerAWSAccountId": customer,
        "LicenseArn": LICENSE,
        "Dimension": "gb",
        "Quantity": quantity,
        **fields,
    }


@dataclass
class Spooled:
    """A queue on a shared store with its spool, driven by the test (no background loop)."""

    queue: UsageQueue
    store: PostgresStore
    spool: Spool
    metrics: Metrics

    async def submit(self, *records: dict[str, Any], accept_partial: bool = False) -> Any:
        """Queue records; return the receipt as the API renders it."""
        receipt: UsageRecordsReceipt = await self.queue.submit(
            list(records), accept_partial=accept_partial
        )
        return receipt.model_dump(mode="json")

    async def record(self, record_id: str) -> dict[str, Any]:
        """A record as the API shows it."""
        view = await self.queue.record(record_id)
        assert view is not None, record_id
        return view.model_dump(mode="json")

    async def drain(self, within: float = 60) -> None:
        """Move until nothing waits (the spool's loop would; bounded)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + within
        while self.spool.file.waiting:
            try:
                if not self.store.is_open:
                    await self.store.open()
                await self.spool.move_batch()
            except StoreUnavailable:
                assert loop.time() < end, "the spool never emptied"
                await asyncio.sleep(0.2)

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value (0 when absent)."""
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@asynccontextmanager
async def spooled_queue(
    dsn: str,
    path: Path,
    *,
    deadline: float = 3.0,
    open_store: bool = True,
) -> AsyncIterator[Spooled]:
    """The parts as ``app.queue.startup`` wires them for a shared store."""
    metrics = Metrics()
    store = PostgresStore(
        dsn,
        POLICY,
        pool_size=4,
        statement_timeout=2,
        claim_lease=30,
        connect_timeout=2,
        deadline=deadline,
        idle_transaction_timeout=5,
    )
    spool = Spool(
        SpoolFile(SqliteStore(path, POLICY)), store, metrics, retention=timedelta(hours=168)
    )
    await spool.file.open()
    if open_store:
        await store.open()
    dispatcher = Dispatcher(
        store,
        SandboxBackend(product_code=PRODUCT),
        metrics,
        DispatchPolicy(
            mode="saas",
            poll_interval=5,
            retention=timedelta(hours=168),
            key_retention=timedelta(hours=720),
            grace=POLICY.grace,
            retry=RETRY,
        ),
    )
    rules = IntakeRules(
        mode="saas", product_code=PRODUCT, policy=POLICY, future_tolerance=timedelta(minutes=5)
    )
    queue = UsageQueue(store, dispatcher, rules, metrics, spool=spool)
    try:
        yield Spooled(queue, store, spool, metrics)
    finally:
        await store.close(budget=1)
        await spool.file.close(budget=5)


@pytest.fixture
def proxied(postgres_server: PgServer) -> Iterator[tuple[TcpProxy, str, str]]:
    """A fresh database, a proxy in front of its server: (proxy, DSN through it, DSN)."""
    name = new_database_name()
    dsn = postgres_server.create_database(name)
    proxy, through = TcpProxy.for_dsn(dsn)
    try:
        yield proxy, through, dsn
    finally:
        proxy.close()
        postgres_server.drop_database(name)


def _rows(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql.encode()).fetchall()


# -- spooling and moving ----------------------------------------------------


async def test_a_lost_store_spools_with_the_same_ids_and_moves_them_in_order(
    proxied: tuple[TcpProxy, str, str], tmp_path: Path
) -> None:
    proxy, through, dsn = proxied
    async with spooled_queue(through, tmp_path / "spool.sqlite3") as q:
        direct = await q.submit(record(quantity=1))
        assert direct["Accepted"][0]["Status"] == "pending"
        assert direct["Accepted"][0]["GrainId"] is not None
        proxy.cut()
        # The call that finds the store gone is spooled (its outcome unknown: its ids).
        first = await q.submit(record(quantity=2, IdempotencyKey="job-1"), record(quantity=3))
        receipts = first["Accepted"]
        assert [r["Status"] for r in receipts] == ["spooled", "spooled"]
        assert [r["GrainId"] for r in receipts] == [None, None]
        assert receipts[0]["Hour"] == direct["Accepted"][0]["Hour"]
        assert q.metric("metering_spooled_records_total", cause="store_failed") == 2
        # The store is known down now: no waiting on it.
        later = await q.submit(record(quantity=4))
        assert later["Accepted"][0]["Status"] == "spooled"
        assert q.metric("metering_spooled_records_total", cause="store_unavailable") == 1
        # A key waiting in the spool keeps its meaning there.
        replay = await q.submit(record(quantity=2, IdempotencyKey="job-1"))
        assert replay["Accepted"][0]["Id"] == receipts[0]["Id"]
        assert replay["Accepted"][0]["Replayed"] is True
        with pytest.raises(Conflict):
            await q.submit(record(quantity=9, IdempotencyKey="job-1"))
        view = await q.record(receipts[0]["Id"])
        assert view["Status"] == "spooled"
        assert view["Grain"] is None
        assert view["Spool"]["State"] == "spooled"
        assert view["Spool"]["Cause"] == "store_failed"
        assert view["IdempotencyKey"] == "job-1"
        assert q.spool.file.waiting == 3
        checks = await q.queue.readiness()
        assert checks["queue"].ok is False
        assert checks["queue"].blocking is False
        assert "new usage goes to the local spool" in checks["queue"].detail
        assert checks["spool"].ok is False
        assert checks["spool"].detail.startswith("3 records wait")
        assert q.metric("metering_queue_store_problem") == 1
        assert q.metric("metering_spool_waiting_records") == 3

        proxy.restore()
        await q.drain()
        assert q.metric("metering_spool_settled_records_total", outcome="moved") == 3
        assert q.metric("metering_spool_waiting_records") == 0
        assert q.metric("metering_queue_store_problem") == 0
        # Moved under the same ids, in order, summed into the same grain.
        view = await q.record(receipts[0]["Id"])
        assert view["Status"] == "pending"
        assert view["Spool"] is None
        assert view["Grain"]["Id"] == direct["Accepted"][0]["GrainId"]
        assert view["Grain"]["Quantity"] == "10"
        ids = [r[0] for r in _rows(dsn, "SELECT id FROM usage_records ORDER BY id")]
        assert ids == sorted(
            [direct["Accepted"][0]["Id"], *(r["Id"] for r in receipts), later["Accepted"][0]["Id"]]
        )
        # The key is the store's now: a replay there is the spooled record.
        again = await q.submit(record(quantity=2, IdempotencyKey="job-1"))
        assert again["Accepted"][0]["Id"] == receipts[0]["Id"]
        assert again["Accepted"][0]["Replayed"] is True
        checks = await q.queue.readiness()
        assert (checks["queue"].ok, checks["spool"].ok) == (True, True)


async def test_a_call_behind_a_waiting_key_is_spooled_behind_it(
    proxied: tuple[TcpProxy, str, str], tmp_path: Path
) -> None:
    proxy, through, _ = proxied
    async with spooled_queue(through, tmp_path / "spool.sqlite3") as q:
        proxy.cut()
        spooled = await q.submit(record(IdempotencyKey="job-2"))
        proxy.restore()
        await q.store.check_writable()  # the store answers; the spool has not moved yet
        # Its key waits in the spool: the spool answers it (the first record stays first).
        replay = await q.submit(record(IdempotencyKey="job-2"))
        assert replay["Accepted"][0]["Id"] == spooled["Accepted"][0]["Id"]
        assert replay["Accepted"][0]["Replayed"] is True
        # Other calls go straight to the store.
        direct = await q.submit(record(IdempotencyKey="job-3"), record())
        assert [r["Status"] for r in direct["Accepted"]] == ["pending", "pending"]
        await q.drain()
        (grain,) = await q.store.list_grains(Filters(), None, 10)
        assert grain.content.quantity == 3


async def test_spooled_records_the_store_refuses_end_rejected_visible_and_counted(
    proxied: tuple[TcpProxy, str, str], tmp_path: Path
) -> None:
    proxy, through, _ = proxied
    async with spooled_queue(through, tmp_path / "spool.sqlite3") as q:
        # In the store: a key with its content, and a customer whose subscription ends.
        await q.submit(record("222233334444", 5, IdempotencyKey="job-4"))
        proxy.cut()
        spooled = await q.submit(
            record("222233334444", 5, IdempotencyKey="job-4"),  # a replay, once moved
            record("222233334444", 6, IdempotencyKey="job-4b"),
            record("333344445555", 7, IdempotencyKey="job-4b"),  # other content: 409 later
            {"CustomerIdentifier": "cust-leaving", "Dimension": "gb", "Quantity": 8},
            accept_partial=True,
        )
        # job-4b's second use conflicts inside the spool already (AcceptPartial).
        assert [r["Index"] for r in spooled["Accepted"]] == [0, 1, 3]
        assert [r["Index"] for r in spooled["Rejected"]] == [2]
        ids = [r["Id"] for r in spooled["Accepted"]]
        proxy.restore()
        # Meanwhile the customer's subscription ended, and a replica took job-4b's key
        # with other content.
        await q.store.apply_event(
            sns("unsubscribe-success", "cust-leaving", utc_now()), utc_now(), timedelta(0)
        )
        await q.store.ingest([_intake("job-4b", "other-content")], all_or_nothing=True)
        await q.drain()
        replayed, conflicted, ended = [await q.record(i) for i in ids]
        assert replayed["Status"] == "replayed"
        assert replayed["Spool"]["State"] == "replayed"
        assert replayed["Grain"] is not None
        assert replayed["Spool"]["ReplayOf"] != ids[0]
        assert conflicted["Status"] == "rejected"
        assert conflicted["Reason"] == "IdempotencyKeyConflict"
        assert "job-4b" in conflicted["Spool"]["Detail"]
        assert ended["Status"] == "rejected"
        assert ended["Reason"] == "CustomerSubscriptionEnded"
        assert ended["Grain"] is None
        assert q.metric("metering_spool_settled_records_total", outcome="rejected") == 2
        assert q.metric("metering_spool_settled_records_total", outcome="replayed") == 1
        assert q.metric("metering_usage_refusals_total", reason="CustomerSubscriptionEnded") == 1
        assert q.spool.file.waiting == 0
        # Nothing of them was counted: the one grain holds only the first record.
        grains = await q.store.list_grains(Filters(customer="222233334444"), None, 10)
        assert [g.content.quantity for g in grains] == [5]


async def test_usage_whose_grain_was_sent_meanwhile_rolls_forward(
    proxied: tuple[TcpProxy, str, str], tmp_path: Path
) -> None:
    proxy, through, _ = proxied
    async with spooled_queue(through, tmp_path / "spool.sqlite3") as q:
        an_hour_ago = (utc_now() - timedelta(hours=2)).isoformat()
        await q.submit(record(quantity=1, Timestamp=an_hour_ago))
        proxy.cut()
        spooled = await q.submit(record(quantity=2, Timestamp=an_hour_ago))
        proxy.restore()
        assert await q.store.freeze_due(utc_now()) == 1
        await q.drain()
        view = await q.record(spooled["Accepted"][0]["Id"])
        assert view["RolledForward"] is True
        assert view["Grain"]["Status"] == "open"
        assert view["Grain"]["Quantity"] == "2"


async def test_the_spool_outlives_a_restart(
    proxied: tuple[TcpProxy, str, str], tmp_path: Path
) -> None:
    proxy, through, dsn = proxied
    path = tmp_path / "spool.sqlite3"
    proxy.cut()
    async with spooled_queue(through, path, open_store=False) as q:
        spooled = await q.submit(record(quantity=3), record(quantity=4))
        assert [r["Status"] for r in spooled["Accepted"]] == ["spooled", "spooled"]
    proxy.restore()
    async with spooled_queue(through, path, open_store=False) as q:
        assert q.spool.file.waiting == 2
        assert (await q.record(spooled["Accepted"][1]["Id"]))["Status"] == "spooled"
        await q.drain()  # opens the store (its migrations) and moves
    assert [int(r[0]) for r in _rows(dsn, "SELECT COUNT(*) FROM usage_records")] == [2]


# -- every wait bounded -----------------------------------------------------


async def test_a_stopped_database_holds_no_call_past_the_deadline(
    private_postgres: PgServer, tmp_path: Path
) -> None:
    """SIGSTOP on every PostgreSQL process during intake: the call is spooled within the
    store deadline, reads answer 503 at once, and nothing is counted twice after."""
    dsn = private_postgres.create_database("queue")
    async with spooled_queue(dsn, tmp_path / "spool.sqlite3", deadline=2) as q:
        await q.submit(record(quantity=1))
        with frozen(private_postgres):
            # Bounded by far more than the deadline: without one, this waits forever.
            taken = await asyncio.wait_for(q.submit(record(quantity=2)), 60)
            assert taken["Accepted"][0]["Status"] == "spooled"
            again = await asyncio.wait_for(q.submit(record(quantity=3)), 60)
            assert again["Accepted"][0]["Status"] == "spooled"
            assert q.metric("metering_spooled_records_total", cause="store_unavailable") == 1
            with pytest.raises(Exception, match="cannot be used now"):
                await asyncio.wait_for(q.queue.records(Filters(), None, 10), 5)
            # The dispatcher's own calls give up too.
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(q.store.next_wakeup(), 60)
        await q.drain()
        (grain,) = await q.store.list_grains(Filters(), None, 10)
        assert grain.content.quantity == 6
        (count,) = _rows(dsn, "SELECT COUNT(*) FROM usage_records")
        assert count[0] == 3


# -- helpers ----------------------------------------------------------------

_serial = iter(range(1, 10**9))


def _intake(key: str, content: str = "", *, at: datetime | None = None) -> Intake:
    """A record of customer 555566667777, this hour (or ``at``'s), with IdempotencyKey
    ``key`` unless it is one letter."""
    n = next(_serial)
    when = at or utc_now()
    grain = GrainKey("batch", "", LICENSE, "", "555566667777", "gb", hour_of(when))
    return Intake(
        record_id=f"ur_test{n:012d}",
        idempotency_key=key if len(key) > 1 else None,
        content_hash=content or f"hash-{n}",
        usage=Usage(grain, when, Decimal(1), False),
        record=f'{{"n":{n}}}',
        received_at=when,
    )
