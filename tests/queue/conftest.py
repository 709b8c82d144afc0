"""The queue in-process, with a clock the test moves, sending over HTTP to a fake AWS
whose rules follow the same clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.credentials import ReadOnlyCredentials

from app.actions.upstream import AwsMeteringBackend
from app.aws.credentials import CredentialProvider, ResolvedCredentials
from app.aws.health import UpstreamHealth
from app.aws.http_client import create_client
from app.aws.quota import ActionQuotas
from app.config import QueueMode, Settings
from app.metering.billing import SubmissionWindows
from app.queue.dispatcher import Dispatcher, DispatchPolicy
from app.queue.intake import IntakeRules
from app.queue.postgres import PostgresStore
from app.queue.sqlite import SqliteStore
from app.queue.store import GrainPolicy, UsageStore
from app.queue.usage_queue import UsageQueue
from app.runtime.metrics import Metrics
from tests.conftest import PRODUCT
from tests.fakes import FakeMetering, IssuedKey, KeyRegistry, RunningServer, serve
from tests.pg import PgServer, new_database_name
from tests.queue.fast_retry import fast_retry

START = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def set(self, hour: int, minute: int = 0, second: int = 0) -> None:
        """Jump to a time of START's day."""
        self.now = START.replace(hour=hour, minute=minute, second=second)

    def advance(self, **delta: float) -> None:
        """Move forward."""
        self.now += timedelta(**delta)


@dataclass
class QueueFake:
    """A fake AWS endpoint on its own clock, and the key it trusts."""

    metering: FakeMetering
    server: RunningServer
    key: IssuedKey
    clock: Clock


@pytest.fixture(scope="module")
def queue_fake_module() -> Iterator[QueueFake]:
    """One fake per module: its rules run on a clock the tests move."""
    clock = Clock(START)
    registry = KeyRegistry()
    key = registry.issue("arn:aws:iam::123456789012:user/queue", None)
    metering = FakeMetering(registry, region="us-east-1", clock=clock)
    with serve(metering) as server:
        yield QueueFake(metering, server, key, clock)


@pytest.fixture
def queue_fake(queue_fake_module: QueueFake) -> QueueFake:
    """The module's fake, reset, its clock back at START."""
    metering = queue_fake_module.metering
    metering.quiet()
    metering.reset()
    metering.faults.clear()
    # reset() keeps configuration; tests here change some of it.
    metering.dimensions = None
    metering.products = None
    metering.batch_window = timedelta(hours=24)
    queue_fake_module.clock.now = START
    return queue_fake_module


class StoreFactory:
    """Makes the stores a test runs on: SQLite files or PostgreSQL databases.

    Each ``name`` is one backing store (a file, a database); a second store of
    the same name opens the same data again, as a restart (or another replica
    of a shared store) would.
    """

    def __init__(self, kind: str, tmp_path: Path, server: PgServer | None) -> None:
        self.kind = kind
        self._tmp_path = tmp_path
        self._server = server
        self._databases: dict[str, str] = {}

    def dsn(self, name: str = "main") -> str:
        """The DSN of database ``name`` (PostgreSQL only), created on first use."""
        assert self._server is not None
        if name not in self._databases:
            database = new_database_name()
            self._server.create_database(database)
            self._databases[name] = database
        return self._server.dsn(self._databases[name])

    def __call__(self, policy: GrainPolicy, *, name: str = "main") -> UsageStore:
        """A new store over backing store ``name``."""
        if self.kind == "postgresql":
            return PostgresStore(
                self.dsn(name), policy, pool_size=4, statement_timeout=5, claim_lease=30
            )
        return SqliteStore(self._tmp_path / name / "queue.sqlite3", policy)

    def drop(self) -> None:
        """Drop the databases made."""
        if self._server is not None:
            for database in self._databases.values():
                self._server.drop_database(database)


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Each test of the queue's behaviour runs on both stores."""
    server = request.getfixturevalue("postgres_server") if request.param == "postgresql" else None
    factory = StoreFactory(request.param, tmp_path, server)
    yield factory
    factory.drop()


@dataclass
class Harness:
    """The queue's parts, wired as the lifespan wires them, but driven by the test."""

    queue: UsageQueue
    store: UsageStore
    dispatcher: Dispatcher
    metrics: Metrics
    clock: Clock
    fake: QueueFake
    backend: AwsMeteringBackend

    async def submit(self, *records: dict[str, Any], accept_partial: bool = False) -> Any:
        """Queue records; return the receipt."""
        return await self.queue.submit(list(records), accept_partial=accept_partial)

    async def cycle(self) -> None:
        """One dispatcher cycle at the current time."""
        await self.dispatcher.run_once()

    def sent(self, action: str = "BatchMeterUsage") -> list[Any]:
        """Bodies of the calls the fake answered with 200."""
        return [r.json() for r in self.fake.metering.requests_for(action) if r.status == 200]


def batch_record(customer: str = "111122223333", **fields: Any) -> dict[str, Any]:
    """A queued SaaS record with sensible defaults."""
    record: dict[str, Any] = {
        "CustomerAWSAccountId": customer,
        "LicenseArn": LICENSE,
        "Dimension": "gigabytes",
        "Quantity": 1,
    }
    if "QuantityAsDecimal" in fields:
        del record["Quantity"]
    record.update(fields)
    return {k: v for k, v in record.items() if v is not None}


@asynccontextmanager
async def queue_harness(
    stores: StoreFactory,
    fake: QueueFake,
    *,
    name: str = "main",
    mode: QueueMode = "saas",
    grace: float = 300,
    windows: SubmissionWindows | None = None,
    margin: float = 300,
    retention: timedelta = timedelta(hours=168),
    key_retention: timedelta = timedelta(hours=720),
    send_attempts: int = 1,
    customer_grace: float = 900,
) -> AsyncIterator[Harness]:
    """A queue on backing store ``name`` of ``stores``, sending to ``fake``; each send
    makes ``send_attempts`` requests at most (a resend with refreshed credentials is one);
    a leaving customer's usage is taken ``customer_grace`` seconds."""
    clock = fake.clock
    settings = Settings(
        mode="aws",
        endpoint_url=fake.server.url,
        region="us-east-1",
        product_code=PRODUCT,
        queue_mode=mode,
        queue_grace=grace,
    )
    metrics = Metrics()
    key = fake.key
    credentials = CredentialProvider(
        lambda: ResolvedCredentials(
            ReadOnlyCredentials(key.access_key_id, key.secret_access_key, None),
            None,
            "test",
            clock(),
        ),
        refresh_margin=900,
        retry_interval=5,
    )
    async with AsyncExitStack() as stack:
        await credentials.start()
        stack.push_async_callback(credentials.close)
        client = create_client(settings)
        stack.push_async_callback(client.aclose)
        backend = AwsMeteringBackend(
            client,
            endpoint=fake.server.url,
            region="us-east-1",
            credentials=credentials,
            quotas=ActionQuotas({}),
            health=UpstreamHealth(metrics, clock=clock),
            metrics=metrics,
        )
        policy = GrainPolicy(
            grace=timedelta(seconds=grace),
            windows=windows or SubmissionWindows(),
            margin=timedelta(seconds=margin),
        )
        store = stores(policy, name=name)
        await store.open()
        stack.push_async_callback(store.close)
        dispatcher = Dispatcher(
            store,
            backend,
            metrics,
            DispatchPolicy(
                mode=mode,
                poll_interval=1,
                retention=retention,
                key_retention=key_retention,
                grace=timedelta(seconds=grace),
                # A grain kept is tried again a minute or more on.
                retry=fast_retry(send_attempts),
            ),
            clock=clock,
        )
        rules = IntakeRules(
            mode=mode,
            product_code=PRODUCT,
            policy=policy,
            future_tolerance=timedelta(minutes=5),
        )
        queue = UsageQueue(
            store,
            dispatcher,
            rules,
            metrics,
            clock=clock,
            customer_grace=timedelta(seconds=customer_grace),
        )
        yield Harness(queue, store, dispatcher, metrics, clock, fake, backend)
