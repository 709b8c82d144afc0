"""Group commit on the shared PostgreSQL store (``app.queue.postgres``): concurrent intake
calls share one transaction (counted by the database itself), each keeps the outcome it
would have alone, a group whose transaction fails sends every one of its calls down the
failure path (the local spool) and each record is counted once after, and one hot grain
hit by three replicas at once is billed once, with the exact sum."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from app.metering.billing import hour_of, utc_now
from app.metering.grains import GrainKey, Usage
from app.queue.postgres import PostgresStore
from app.queue.records import Filters
from app.queue.registry import ENDED
from app.queue.store import (
    GrainPolicy,
    Intake,
    IntakeFailure,
    IntakeRefused,
    Receipt,
    StoreUnavailable,
)
from tests.conftest import PRODUCT
from tests.fakes import FakeMetering, KeyRegistry, serve
from tests.pg import PgServer, new_database_name
from tests.queue.conftest import LICENSE
from tests.queue.pg_faults import TcpProxy
from tests.queue.test_customers import sns
from tests.queue.test_queue_api import wait_until
from tests.queue.test_spool import record, spooled_queue
from tests.sidecar import run_sidecar

POLICY = GrainPolicy(grace=timedelta(minutes=5))
NOW = utc_now()
HOUR = hour_of(NOW)
_serial = iter(range(1, 10**9))
# What a call gets back from the store: outcomes, or the exception it raised.
Outcome = list[Receipt | IntakeFailure | None] | BaseException


def _intake(
    account: int,
    quantity: int,
    *,
    key: str | None = None,
    content: str | None = None,
    identifier: str = "",
    dimension: str = "gb",
) -> Intake:
    """A record of this hour for customer ``account`` (or ``identifier``, under the
    configured product), ``content`` standing for what its key's hash covers."""
    n = next(_serial)
    grain = (
        GrainKey("batch", PRODUCT, "", identifier, "", dimension, HOUR)
        if identifier
        else GrainKey("batch", "", LICENSE, "", f"{100000000000 + account}", dimension, HOUR)
    )
    return Intake(
        record_id=f"ur_{n:016d}",
        idempotency_key=key,
        content_hash=f"hash-{content or n}",
        usage=Usage(grain, NOW, Decimal(quantity), False),
        record=f'{{"n":{n}}}',
        received_at=NOW,
    )


@asynccontextmanager
async def _store(dsn: str, *, statement_timeout: float = 5) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(
        dsn, POLICY, pool_size=4, statement_timeout=statement_timeout, claim_lease=30
    )
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def _next_xid(dsn: str) -> int:
    """The next transaction id the database will assign: the count of writing
    transactions so far, read without writing (a plain SELECT is assigned none)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()
    assert row is not None
    return int(row[0])


def _scalar(dsn: str, statement: str) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(statement.encode()).fetchone()
    assert row is not None
    return row[0]


async def _quantities(store: PostgresStore) -> dict[str, Decimal]:
    grains = await store.list_grains(Filters(), None, 100)
    return {
        g.key.customer_aws_account_id or g.key.customer_identifier: g.content.quantity
        for g in grains
    }


async def _outcome(call: Any) -> Outcome:
    try:
        result: list[Receipt | IntakeFailure | None] = list(await call)
    except (IntakeRefused, StoreUnavailable) as exc:
        return exc
    return result


# -- 1. gathered -------------------------------------------------------------------


async def test_concurrent_calls_share_transactions_counted_by_the_database(
    postgres_dsn: str,
) -> None:
    async with _store(postgres_dsn) as store:
        await store.ingest([_intake(1, 1)], all_or_nothing=True)
        rng = random.Random(5)
        quantities = [rng.randint(1, 9) for _ in range(50)]
        intakes = [_intake(1, q) for q in quantities]

        async def call(n: int) -> list[Receipt | IntakeFailure]:
            # Arriving over some 10 ms: several groups, each of the calls that came while
            # the one before committed.
            await asyncio.sleep(n / 5000)
            return await store.ingest([intakes[n]], all_or_nothing=True)

        xid, commits = _next_xid(postgres_dsn), store.commits
        results = await asyncio.gather(*(call(n) for n in range(50)))
        transactions = _next_xid(postgres_dsn) - xid
        groups = store.commits - commits
        # Fewer writing transactions than calls, as the database counts them (at least
        # one per group: autovacuum may add its own).
        assert groups <= transactions < 50, (groups, transactions)
        (grain,) = await store.list_grains(Filters(), None, 10)
        for intake, (receipt,) in zip(intakes, results, strict=True):
            assert receipt == Receipt(intake.record_id, grain.id, HOUR, False, False, "open")
        assert grain.content.quantity == 1 + sum(quantities)
        assert _scalar(postgres_dsn, "SELECT COUNT(*) FROM usage_records") == 51

        # All at once: bounded groups (256 calls at most), the rest in the next one.
        many = [_intake(2, 1) for _ in range(300)]
        xid, commits = _next_xid(postgres_dsn), store.commits
        await asyncio.gather(*(store.ingest([i], all_or_nothing=True) for i in many))
        assert store.commits - commits == 2
        assert 2 <= _next_xid(postgres_dsn) - xid < 10
        assert (await _quantities(store))[f"{100000000002}"] == 300


# -- 2. each call's outcome its own ----------------------------------------------


def _isolation_calls() -> tuple[Intake, list[tuple[list[Intake], bool]]]:
    """A record stored first, then calls of one group, each with something of its own
    to be decided: (records, all or nothing)."""
    ended = "cust-ended"
    seed = _intake(1, 5, key="seen", content="seen")
    return seed, [
        ([_intake(1, 2)], True),
        # The customer's subscription ended: refused whole, or the record alone.
        ([_intake(0, 3, identifier=ended)], True),
        ([_intake(1, 4), _intake(0, 5, identifier=ended)], False),
        # A key seen before (the seed), with its content: a replay.
        ([_intake(1, 6, key="seen", content="seen")], True),
        # A new key, then the seen key with other content: refused whole, so its new key
        # is not taken either...
        ([_intake(1, 7, key="new", content="new"), _intake(1, 8, key="seen")], True),
        # ... and the next call's copy of that key is the first one (counted), the one
        # after a replay of it (not counted).
        ([_intake(1, 11, key="new", content="new")], True),
        ([_intake(1, 13, key="new", content="new")], True),
        ([_intake(2, 17)], True),
    ]


async def _run_isolation(
    dsn: str, seed: Intake, calls: list[tuple[list[Intake], bool]], *, together: bool
) -> tuple[list[Outcome], dict[str, Decimal], int]:
    """The calls on a fresh store with a seed record and an ended customer: in one group
    (``together``) or one by one; their outcomes, the grains' sums, the groups."""
    async with _store(dsn) as store:
        # At one moment for both runs: the refusals say since when.
        event = sns("unsubscribe-success", "cust-ended", NOW)
        assert (await store.apply_event(event, NOW, timedelta(minutes=15))).outcome == "applied"
        (stored,) = await store.ingest([seed], all_or_nothing=True)
        assert isinstance(stored, Receipt)
        commits = store.commits
        if together:
            outcomes = list(
                await asyncio.gather(
                    *(_outcome(store.ingest(i, all_or_nothing=a)) for i, a in calls)
                )
            )
        else:
            outcomes = [await _outcome(store.ingest(i, all_or_nothing=a)) for i, a in calls]
        return outcomes, await _quantities(store), store.commits - commits


def _comparable(outcome: Outcome) -> Any:
    if isinstance(outcome, IntakeRefused):
        return ("refused", outcome.failures)
    assert isinstance(outcome, list), outcome
    return outcome


async def test_each_call_of_a_group_keeps_its_own_outcome(
    postgres_dsn: str, postgres_server: PgServer
) -> None:
    seed, calls = _isolation_calls()
    grouped, sums, groups = await _run_isolation(postgres_dsn, seed, calls, together=True)
    assert groups == 1
    assert isinstance(grouped[0], list)
    assert isinstance(grouped[0][0], Receipt)
    refused = grouped[1]
    assert isinstance(refused, IntakeRefused)
    assert [(f.index, f.reason) for f in refused.failures] == [(0, ENDED)]
    partial = grouped[2]
    assert isinstance(partial, list)
    assert isinstance(partial[0], Receipt)
    assert isinstance(partial[1], IntakeFailure)
    assert (partial[1].index, partial[1].reason) == (1, ENDED)
    (replay,) = grouped[3]  # type: ignore[misc]
    assert isinstance(replay, Receipt)
    assert (replay.record_id, replay.replayed) == (seed.record_id, True)
    conflict = grouped[4]
    assert isinstance(conflict, IntakeRefused)
    assert [(f.index, f.conflict) for f in conflict.failures] == [(1, True)]
    (first_new,) = grouped[5]  # type: ignore[misc]
    (again,) = grouped[6]  # type: ignore[misc]
    assert isinstance(first_new, Receipt)
    assert isinstance(again, Receipt)
    assert not first_new.replayed
    assert first_new.record_id == calls[5][0][0].record_id
    assert (again.record_id, again.replayed) == (first_new.record_id, True)
    # Counted: the seed 5, then 2 + 4 + 11; the other customer 17; nothing of the
    # ended customer, the refused calls or the replays.
    assert sums == {f"{100000000001}": 22, f"{100000000002}": 17}
    # The same calls one by one, each its own transaction as before group commit,
    # come out the same.
    alone = new_database_name()
    try:
        one_by_one, alone_sums, alone_groups = await _run_isolation(
            postgres_server.create_database(alone), seed, calls, together=False
        )
    finally:
        postgres_server.drop_database(alone)
    assert alone_groups == len(calls)
    assert [_comparable(o) for o in grouped] == [_comparable(o) for o in one_by_one]
    assert alone_sums == sums


async def test_a_value_the_database_refuses_fails_its_call_alone(postgres_dsn: str) -> None:
    """A value PostgreSQL refuses (a NUL: the records' checks refuse it now, this is the
    store's own defence for whatever else it may refuse): the group it came in fails,
    and its other calls are written again one by one."""
    async with _store(postgres_dsn) as store:
        calls = [
            [_intake(1, 1)],
            [_intake(1, 2)],
            [_intake(1, 100, dimension="g\x00b")],
            [_intake(1, 3)],
            [_intake(2, 4)],
        ]
        commits = store.commits
        outcomes = await asyncio.gather(
            *(_outcome(store.ingest(c, all_or_nothing=True)) for c in calls)
        )
        assert isinstance(outcomes[2], StoreUnavailable)
        for call, outcome in zip(calls, outcomes, strict=True):
            if call is not calls[2]:
                assert isinstance(outcome, list)
                assert [r.record_id for r in outcome if isinstance(r, Receipt)] == [
                    call[0].record_id
                ]
        # The group failed (no commit), then each call alone: four of them committed.
        assert store.commits - commits == 4
        assert await _quantities(store) == {f"{100000000001}": 6, f"{100000000002}": 4}
        # The store answers again: the good calls' commits said so.
        assert store.problem is None


# -- 3. a group's transaction failing ----------------------------------------------


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


def _terminate_when_waiting(dsn: str, within: float = 10) -> int:
    """Terminate the sidecar's backend once it waits for a lock; its pid."""
    end = time.monotonic() + within
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < end:
            row = conn.execute(
                "SELECT pg_terminate_backend(pid), pid FROM pg_stat_activity "
                "WHERE application_name = 'metering-sidecar' AND wait_event_type = 'Lock'"
            ).fetchone()
            if row is not None:
                assert row[0] is True
                return int(row[1])
            time.sleep(0.01)
    raise AssertionError("the group never waited for the lock")


async def test_a_group_terminated_mid_transaction_is_spooled_whole_and_moved_once(
    postgres_dsn: str, tmp_path: Path
) -> None:
    async with spooled_queue(postgres_dsn, tmp_path / "spool.sqlite3", deadline=8) as q:
        first = await q.submit(record(quantity=1))
        assert first["Accepted"][0]["Status"] == "pending"
        quantities = list(range(1, 21))
        with psycopg.connect(postgres_dsn) as blocker:
            # Another session holds the grain's row: the group's transaction waits
            # there, holding its advisory locks, when its backend is terminated.
            blocker.execute("SELECT id FROM grains FOR UPDATE")
            calls = asyncio.gather(*(q.submit(record(quantity=n)) for n in quantities))
            await asyncio.to_thread(_terminate_when_waiting, postgres_dsn)
            receipts = await calls
        statuses = [r["Accepted"][0]["Status"] for r in receipts]
        assert statuses == ["spooled"] * 20
        assert q.metric("metering_spooled_records_total", cause="store_failed") == 20
        await q.drain()
        assert q.metric("metering_spool_settled_records_total", outcome="moved") == 20
        (grain,) = await q.store.list_grains(Filters(), None, 10)
        assert grain.content.quantity == 1 + sum(quantities)
        ids = {r["Accepted"][0]["Id"] for r in receipts}
        stored = await q.store.list_records(Filters(), None, 100)
        assert {r.id for r in stored} == ids | {first["Accepted"][0]["Id"]}


async def test_a_group_whose_commit_answer_was_lost_is_counted_once(
    proxied: tuple[TcpProxy, str, str], tmp_path: Path
) -> None:
    proxy, through, dsn = proxied
    async with spooled_queue(through, tmp_path / "spool.sqlite3", deadline=8) as q:
        # The group's are the first records inserted: the proxy knows the insert by its
        # text, which a prepared statement's later uses no longer carry.
        proxy.lose_next_commit_answer()
        quantities = list(range(1, 21))
        receipts = await asyncio.gather(*(q.submit(record(quantity=n)) for n in quantities))
        assert proxy.answers_lost == 1
        # The group committed; none of its calls could know: all spooled, same ids.
        assert [r["Accepted"][0]["Status"] for r in receipts] == ["spooled"] * 20
        assert _scalar(dsn, "SELECT COUNT(*) FROM usage_records") == 20
        await q.drain()
        assert q.metric("metering_spool_settled_records_total", outcome="already_stored") == 20
        assert q.metric("metering_spool_settled_records_total", outcome="moved") == 0
        (grain,) = await q.store.list_grains(Filters(), None, 10)
        assert grain.content.quantity == sum(quantities)
        assert _scalar(dsn, "SELECT COUNT(*) FROM usage_records") == 20
        ids = {r["Accepted"][0]["Id"] for r in receipts}
        assert {r.id for r in await q.store.list_records(Filters(), None, 100)} == ids


# -- 4. the hot grain ----------------------------------------------------------------

REPLICAS = 3
CONNECTIONS = 16
CALLS_PER_CONNECTION = 20
# Seconds from the test's start until the hot grain falls due: the replicas start and
# take every call before, so that no call meets the grain frozen (it would roll forward
# to the next hour, a second grain).
DUE_AFTER = 18.0
CUSTOMER = "500000000001"


def _replica_env(url: str, dsn: str, key_id: str, secret: str, grace: int) -> dict[str, str]:
    return {
        "METERING_ENDPOINT_URL": url,
        "METERING_PRODUCT_CODE": PRODUCT,
        "METERING_QUEUE_DSN": dsn,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "METERING_QUEUE_GRACE": str(grace),
        "METERING_QUEUE_POLL_INTERVAL": "0.3",
        "METERING_QUEUE_RETRY_BASE_DELAY": "0.3",
        "METERING_QUEUE_RETRY_MAX_DELAY": "1",
        "METERING_READ_TIMEOUT": "20",
        "METERING_ACCESS_LOG": "false",
    }


async def _post(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, body: bytes
) -> tuple[int, Any]:
    """One ``POST /v1/usage-records`` on a keep-alive connection: (status, JSON body).

    By hand: a client library's CPU per call, three replicas' worth of it on this
    machine's two cores, would be what is measured."""
    writer.write(
        (
            f"POST /v1/usage-records HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in head[1:] if line)
    answer = await reader.readexactly(int(fields["content-length"]))
    return int(head[0].split()[1]), json.loads(answer)


async def _hammer(urls: list[str], body: dict[str, Any], quantities: list[int]) -> list[Any]:
    """``CONNECTIONS`` concurrent connections to each replica, each posting its share of
    single-record calls one after another; every answer (status, body)."""
    answers: list[Any] = []

    async def connection(url: str, share: list[int]) -> None:
        host = url.removeprefix("http://")
        address, port = host.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(address, int(port))
        try:
            for quantity in share:
                records = [{**body, "Quantity": quantity}]
                payload = json.dumps({"UsageRecords": records}).encode()
                answers.append(await asyncio.wait_for(_post(reader, writer, host, payload), 30))
        finally:
            writer.close()
            await writer.wait_closed()

    streams = len(urls) * CONNECTIONS
    shares = [quantities[n::streams] for n in range(streams)]
    await asyncio.gather(*(connection(urls[n % len(urls)], s) for n, s in enumerate(shares)))
    return answers


def test_a_hot_grain_from_three_replicas_is_billed_once_with_the_exact_sum(
    postgres_dsn: str,
) -> None:
    """Every call of three replicas, 16 connections each, is one record for the same
    customer, dimension and hour: all answered 202, the grain sent once when due, with
    the sum of every quantity."""
    started = time.time()
    # The grace makes the hour (just closed, or closing within DUE_AFTER) due then.
    due = datetime.fromtimestamp(math.ceil(started + DUE_AFTER), UTC)
    closes = due.replace(minute=0, second=0, microsecond=0)
    hour = closes - timedelta(hours=1)
    grace = int((due - closes).total_seconds())
    registry = KeyRegistry()
    keys = [registry.issue(f"arn:aws:iam::123456789012:user/hot-{i}", None) for i in range(3)]
    metering = FakeMetering(registry, region="us-east-1")
    rng = random.Random(19)
    quantities = [rng.randint(1, 9) for _ in range(REPLICAS * CONNECTIONS * CALLS_PER_CONNECTION)]
    body = {
        "CustomerAWSAccountId": CUSTOMER,
        "LicenseArn": LICENSE,
        "Dimension": "gb",
        "Timestamp": hour.isoformat().replace("+00:00", "Z"),
    }
    with serve(metering) as fake, ExitStack() as stack:
        starts = [
            run_sidecar(
                _replica_env(
                    fake.url, postgres_dsn, key.access_key_id, key.secret_access_key, grace
                ),
                wait_ready=True,
            )
            for key in keys
        ]
        # Started side by side: the time to the grain's due moment is for the load.
        with ThreadPoolExecutor(len(starts)) as pool:
            replicas = list(pool.map(stack.enter_context, starts))
        answers = asyncio.run(_hammer([r.url for r in replicas], body, quantities))
        loaded = time.time()
        assert [status for status, _ in answers] == [202] * len(quantities), [
            a for a in answers if a[0] != 202
        ][:3]
        receipts = [receipt for _, answer in answers for receipt in answer["Accepted"]]
        assert len(receipts) == len(quantities)
        assert not [r for r in receipts if r["RolledForward"]]
        assert loaded < due.timestamp(), (
            f"the load outlasted the grace ({loaded - started:.1f} s): grow DUE_AFTER"
        )

        def billed() -> bool:
            return bool(metering.batch_records)

        wait_until(billed, due.timestamp() - time.time() + 30, "the hot grain billed")

        def settled() -> bool:
            page = replicas[0].client.get("/v1/usage-records", params={"status": "pending"})
            return page.status_code == 200 and not page.json()["Items"]

        wait_until(settled, 30, "every record settled")
        for replica in replicas:
            assert 'outcome="duplicate_record"' not in replica.client.get("/metrics").text
    (billed_record,) = metering.batch_records.values()
    assert (billed_record.customer, billed_record.dimension) == (CUSTOMER, "gb")
    assert billed_record.hour == hour
    assert billed_record.quantity == sum(quantities)
